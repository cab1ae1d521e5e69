"""Join independently encoded datasets into one (the `bert-prep merge` command).

Pieces prepared on different machines or at different times become one dataset whose shard
list is theirs concatenated in the order given. Shard files are hard-linked when possible
(free, same filesystem) and copied otherwise; their hashes carry over unchanged because the
bytes do.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from data_prep.errors import PrepError
from data_prep.shard_format import FORMAT_VERSION, MANIFEST, read_manifest, write_json_atomic


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
    shards: list[dict] = []
    stats: dict = {}
    for d, m in zip(sources, manifests, strict=True):
        for entry in m["shards"]:
            name = f"shard_{len(shards):05d}"
            for suffix in (".bin", ".idx"):
                _link_or_copy(d / (entry["name"] + suffix), out / (name + suffix))
            shards.append({**entry, "name": name})
        stats = _sum_stats(stats, m.get("stats", {}))
    tokenizer_src = sources[0] / "tokenizer"
    if tokenizer_src.is_dir():
        (out / "tokenizer").mkdir(exist_ok=True)
        for path in sorted(tokenizer_src.iterdir()):
            if path.is_file():
                shutil.copy2(path, out / "tokenizer" / path.name)
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": manifests[0]["tokenizer"],
        "dtype": manifests[0]["dtype"],
        "num_documents": sum(s["documents"] for s in shards),
        "num_sentences": sum(s["sentences"] for s in shards),
        "num_tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
        "stats": stats,
        "merged_from": [str(d) for d in sources],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest
