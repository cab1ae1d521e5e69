"""Join datasets into one (the `bert-prep merge` command).

Two cases, told apart by the manifests:

- **Pieces of one run** (`bert-prep encode --num-shards K --shard-index i`, e.g. a job array):
  every piece has the same plan fingerprint and together they cover every work unit once. The
  merge links their shards under their own names, removes duplicates across pieces as a
  single run would (rewriting only the units that hold a later copy) and writes the manifest
  of the whole run: the result is byte-identical to `bert-prep encode` without pieces.
- **Any datasets with one tokenizer** (different corpora, or prepared at different times):
  their shard lists are concatenated in the order given and renamed `shard_NNNNN`; nothing is
  deduplicated across them.

Shard files are hard-linked when possible (free, same filesystem) and copied otherwise; their
hashes carry over unchanged because the bytes do.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from data_prep.clean import CleanConfig
from data_prep.encode import (
    WORK_DIR,
    EncodeSettings,
    build_manifest,
    hashes_path,
    record_path,
    remove_cross_unit_duplicates,
    remove_stale_files,
    unit_done,
)
from data_prep.errors import PrepError
from data_prep.shard_format import FORMAT_VERSION, MANIFEST, read_manifest, write_json_atomic
from data_prep.sources import ReadConfig


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _sum_stats(a: dict, b: dict) -> dict:
    """Add numeric stats key by key (nested dicts such as 'dropped' too)."""
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict):
            out[key] = _sum_stats(out.get(key, {}), value)
        elif isinstance(value, int | float):
            out[key] = out.get(key, 0) + value
    return out


def _copy_tokenizer(source: Path, out: Path) -> None:
    tokenizer_src = source / "tokenizer"
    if tokenizer_src.is_dir():
        (out / "tokenizer").mkdir(exist_ok=True)
        for path in sorted(tokenizer_src.iterdir()):
            if path.is_file():
                shutil.copy2(path, out / "tokenizer" / path.name)


def _settings_from_dict(data: dict) -> EncodeSettings:
    return EncodeSettings(
        read=ReadConfig(**data["read"]),
        clean=CleanConfig(**data["clean"]),
        **{k: v for k, v in data.items() if k not in ("read", "clean")},
    )


def _are_pieces(manifests: list[dict]) -> bool:
    if not all("piece" in m and "plan" in m for m in manifests):
        return False
    fps = {m["plan"]["fingerprint"] for m in manifests}
    if len(fps) > 1:
        raise PrepError(
            "these pieces come from different inputs or settings (plan fingerprints differ); "
            "run every --shard-index with the same command"
        )
    return True


def _reassemble(sources: list[Path], manifests: list[dict], out: Path) -> dict:
    """Pieces of one run → the dataset a single run would have written."""
    n_units = manifests[0]["plan"]["units"]
    fp = manifests[0]["plan"]["fingerprint"]
    owner: dict[int, Path] = {}
    for d, m in zip(sources, manifests, strict=True):
        start, stop = m["piece"]["units"]
        for unit in range(start, stop):
            if unit in owner:
                raise PrepError(
                    f"unit {unit} is in both {owner[unit]} and {d}; pass each piece once"
                )
            owner[unit] = d
    missing = [u for u in range(n_units) if u not in owner]
    if missing:
        count = manifests[0]["piece"]["count"]
        have = sorted(m["piece"]["index"] for m in manifests)
        raise PrepError(
            f"pieces {have} of {count} do not cover units {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; run the missing --shard-index pieces first"
        )
    for kind in ("units", "hashes"):
        (out / WORK_DIR / kind).mkdir(parents=True, exist_ok=True)
    settings = _settings_from_dict(manifests[0]["settings"])
    records = []
    for unit in range(n_units):
        src = owner[unit]
        record = unit_done(src, unit, fp, check_hashes=False)
        if record is None:
            raise PrepError(f"{src}: unit {unit} is incomplete; re-run that piece, then merge")
        for entry in record["shards"]:
            for suffix in (".bin", ".idx"):
                _link_or_copy(src / (entry["name"] + suffix), out / (entry["name"] + suffix))
        shutil.copy2(record_path(src, unit), record_path(out, unit))
        if hashes_path(src, unit).is_file():
            shutil.copy2(hashes_path(src, unit), hashes_path(out, unit))
        records.append(record)
    records = remove_cross_unit_duplicates(out, records, settings)
    manifest = build_manifest(
        records,
        tokenizer=manifests[0]["tokenizer"],
        dtype=np.dtype(manifests[0]["dtype"]),
        settings=settings,
        inputs=manifests[0]["inputs"],
        fp=fp,
        n_units=n_units,
    )
    return manifest


def _concatenate(sources: list[Path], manifests: list[dict], out: Path) -> dict:
    shards: list[dict] = []
    stats: dict = {}
    for d, m in zip(sources, manifests, strict=True):
        for entry in m["shards"]:
            name = f"shard_{len(shards):05d}"
            for suffix in (".bin", ".idx"):
                _link_or_copy(d / (entry["name"] + suffix), out / (name + suffix))
            shards.append({**entry, "name": name})
        stats = _sum_stats(stats, m.get("stats", {}))
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": manifests[0]["tokenizer"],
        "dtype": manifests[0]["dtype"],
        "num_documents": sum(s["documents"] for s in shards),
        "num_sentences": sum(s["sentences"] for s in shards),
        "num_tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
        "stats": stats,
        "problems": [p for m in manifests for p in m.get("problems", [])][:1000],
    }


def merge_datasets(dirs: Sequence[str | Path], out_dir: str | Path) -> dict:
    """Merge dataset directories that share one tokenizer into `out_dir`; return the manifest."""
    if not dirs:
        raise PrepError("merge needs at least one dataset directory")
    out = Path(out_dir)
    sources = [Path(d) for d in dirs]
    if any(d.resolve() == out.resolve() for d in sources):
        raise PrepError(f"{out}: --out must differ from the directories being merged")
    if (out / MANIFEST).exists():
        raise PrepError(f"{out}: already holds a dataset; choose an empty --out directory")
    manifests = [read_manifest(d) for d in sources]
    first_hash = manifests[0]["tokenizer"]["hash"]
    for d, m in zip(sources, manifests, strict=True):
        if m["tokenizer"]["hash"] != first_hash:
            raise PrepError(
                f"{d}: made with another tokenizer than {sources[0]}; only datasets encoded "
                "with the same tokenizer directory can be merged"
            )
    for d, m in zip(sources, manifests, strict=True):
        for entry in m["shards"]:
            for suffix in (".bin", ".idx"):
                if not (d / (entry["name"] + suffix)).is_file():
                    raise PrepError(f"{d / entry['name']}{suffix}: missing; run `bert-prep verify`")

    out.mkdir(parents=True, exist_ok=True)
    if _are_pieces(manifests):
        manifest = _reassemble(sources, manifests, out)
    else:
        manifest = _concatenate(sources, manifests, out)
    _copy_tokenizer(sources[0], out)
    manifest["run"] = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "merged_from": [str(d) for d in sources],
    }
    write_json_atomic(out / MANIFEST, manifest)
    if "plan" in manifest:
        remove_stale_files(out, manifest)
    return manifest
