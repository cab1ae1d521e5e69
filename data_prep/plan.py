"""Work units: the corpus cut into independent pieces of about `unit_bytes` input bytes.

A unit is a run of whole files (small files are grouped) or a byte range of one large
uncompressed file (cut where a document starts, see `sources.split_points`). Units are the
grain of everything parallel and of resuming: unit u becomes the shards `shard_UUUUU_PPPP`
(parts cut every `shard_tokens` tokens) whichever worker, rank or array-job piece encodes it,
so the output is the same bytes under the same names for any split of the work.

The plan depends only on the file list, the file sizes, the bytes at the split points and the
settings; its fingerprint goes into every unit record and manifest, so that pieces or ranks
started with different inputs are caught instead of mixed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from data_prep.sources import ReadConfig, split_points

SHARD_PREFIX = "shard_"


@dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of input file number `file` (end None = to the end of the file)."""

    file: int
    start: int = 0
    end: int | None = None


@dataclass(frozen=True)
class Unit:
    index: int
    pieces: tuple[Piece, ...]
    bytes: int


def shard_name(unit: int, part: int) -> str:
    """`shard_00012_0003`: fixed by the unit and the part, never by who encoded it."""
    return f"{SHARD_PREFIX}{unit:05d}_{part:04d}"


def plan_units(files: list[Path], unit_bytes: int, read: ReadConfig) -> list[Unit]:
    """Group and split `files` into units of about `unit_bytes` on-disk bytes, in file order.

    Compressed files cannot be entered in the middle, so each is at most one unit; a large
    compressed corpus should come as many files (as CC-100, mC4 and WikiExtractor output do).
    """
    units: list[Unit] = []
    group: list[Piece] = []
    group_bytes = 0

    def close_group() -> None:
        nonlocal group, group_bytes
        if group:
            units.append(Unit(len(units), tuple(group), group_bytes))
            group, group_bytes = [], 0

    for number, path in enumerate(files):
        size = path.stat().st_size
        points = split_points(path, unit_bytes, read)
        if points:
            close_group()
            bounds = [0, *points, size]
            for start, end in zip(bounds[:-1], bounds[1:], strict=True):
                piece = Piece(number, start, None if end == size else end)
                units.append(Unit(len(units), (piece,), end - start))
            continue
        group.append(Piece(number))
        group_bytes += size
        if group_bytes >= unit_bytes:
            close_group()
    close_group()
    return units


def fingerprint(files: list[Path], units: list[Unit], settings: dict, tokenizer_hash: str) -> str:
    """sha256 over what decides the output: inputs (name, size), units, settings, tokenizer."""
    blob = json.dumps(
        {
            "files": [[str(p), p.stat().st_size] for p in files],
            "units": [[[pc.file, pc.start, pc.end] for pc in u.pieces] for u in units],
            "settings": settings,
            "tokenizer": tokenizer_hash,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def block(n: int, index: int, count: int) -> range:
    """The `index`-th of `count` contiguous, near-equal blocks of range(n).

    Contiguous blocks (not round-robin) keep each piece's shards one run of the dataset."""
    return range(n * index // count, n * (index + 1) // count)
