"""Restart and checkpoint costs (issue 19): data start-up against corpus size, bytes read per
rank on resume, and how long a training step is held up by a save.

Run from the repository root (each part takes a few minutes on 2 CPU cores):

    .venv/bin/python -m bench.restart startup --sentences 0.1 1 10   # millions of sentences
    .venv/bin/python -m bench.restart resume-bytes                  # tp 1, 2, 4 (gloo)
    .venv/bin/python -m bench.restart save-block

startup: synthetic shards written with data_prep's ShardWriter (documents of 1-20 sentences of
4-40 tokens, vocabulary 30,000), then the data start-up of a rank, old against new. "old" is
the code before this change, copied below (the Python packing loop and the per-document sentence
lists) plus the first epoch's `rng.permutation(n_samples)` every data-loader worker drew; "new
first start" is `open_training_data` building and caching the index, "new restart" the same
call finding the cache, plus the first shuffled position (a Feistel permutation, no table).

resume-bytes: a 1-step `bert-train` at tp 1, 2 and 4 (gloo processes) writes a checkpoint; then
for every rank the bytes of tensors our reader reads for the rank's piece of every model and
optimizer tensor (`_ShardedReader.local`, what resume does now) against `whole` for every tensor
(what every rank read before), and the size of the files the rank itself wrote.

save-block: the model and LAMB state of a 41.5 M-parameter BERT (hidden 512, 8 layers, vocabulary
30,522); the time training is held up by a checkpoint written synchronously (snapshot, write,
fsync, checksums, rename) against the asynchronous way (a host copy, then a background thread),
and the time of a training step while the background write runs against one without.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- start-up against corpus size
def write_synthetic(directory: Path, sentences: int, seed: int = 0) -> None:
    """A dataset of about `sentences` sentences in shards of at most 2 M sentences."""
    from data_prep.shard_format import ShardWriter, write_json_atomic

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    entries, left, index = [], sentences, 0
    while left > 0:
        count = min(left, 2_000_000)
        docs = rng.integers(1, 21, size=count // 10 + 1)
        docs = docs[: int(np.searchsorted(np.cumsum(docs), count)) + 1]
        docs[-1] -= int(docs.sum()) - count
        docs = docs[docs > 0]
        lengths = rng.integers(4, 41, size=count)
        ids = rng.integers(5, 30_000, size=int(lengths.sum()), dtype=np.uint16)
        writer = ShardWriter(directory / f"shard_{index:05d}", np.uint16)
        writer.add_documents(ids, lengths, docs)
        entries.append(writer.finish())
        left -= count
        index += 1
    special = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    manifest = {
        "format_version": 1,
        "tokenizer": {"vocab_size": 30_000, "hash": "synthetic", "special_ids": special},
        "dtype": "uint16",
        "shards": entries,
    }
    write_json_atomic(directory / "manifest.json", manifest)


def _old_build_split(dataset, docs: np.ndarray, seq_len: int, pairs: bool) -> np.ndarray:
    """pretrain/data.py's build_split before this change (commit 0ce13f7), unchanged."""
    offsets = dataset.document_sentence_offsets()
    counts = offsets[docs + 1] - offsets[docs]
    sentences = np.concatenate([np.arange(offsets[d], offsets[d + 1]) for d in docs] or [[]])
    sentences = sentences.astype(np.int64)
    doc_start = np.zeros(len(sentences), dtype=bool)
    doc_start[np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)] = True
    lengths = dataset.sentence_lengths()[sentences]
    budget = seq_len - (3 if pairs else 2)
    starts = []
    start, used = 0, 0
    for i in range(len(sentences)):
        length = min(int(lengths[i]), budget)
        boundary = bool(doc_start[i]) and i > start
        if i > start and (used + length + boundary > budget or (pairs and boundary)):
            starts.append(start)
            start, used = i, length
        else:
            used += length + boundary
    starts.append(start)
    bounds = np.array(starts + [len(sentences)], dtype=np.int64)
    return np.stack([bounds[:-1], bounds[1:]], axis=1)


def startup(millions: list[float], seq_len: int = 128, valid_fraction: float = 0.01) -> None:
    from data_prep.shard_format import IndexedDataset
    from pretrain.blend import parse_data_path
    from pretrain.config import MLMConfig
    from pretrain.data import open_training_data, split_documents

    print(
        "| sentences | samples | old: index | old: 1st epoch permutation | old total | "
        "new: first start (build + cache) | new: restart (cached) + 1st sample | old / restart |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for m in millions:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            write_synthetic(data, int(m * 1e6))
            dataset = IndexedDataset(data)
            began = time.perf_counter()
            train_docs, valid_docs = split_documents(dataset.num_documents, valid_fraction)
            samples = _old_build_split(dataset, train_docs, seq_len, False)
            _old_build_split(dataset, valid_docs, seq_len, False)
            old_index = time.perf_counter() - began
            began = time.perf_counter()
            np.random.default_rng([0, 0, 0x5EED]).permutation(len(samples))
            old_perm = time.perf_counter() - began

            def open_data(cache: Path, data: Path = data):
                return open_training_data(
                    parse_data_path(str(data)),
                    None,
                    seq_len,
                    valid_fraction,
                    MLMConfig(),
                    0,
                    cache_dir=cache,
                    say=lambda line: None,
                )

            began = time.perf_counter()
            built = open_data(Path(tmp) / "index")
            first = time.perf_counter() - began
            began = time.perf_counter()
            cached = open_data(Path(tmp) / "index")
            cached.train[len(cached.train) // 2]
            restart = time.perf_counter() - began
            assert np.array_equal(built.train.split.samples, samples)
            old = old_index + old_perm
            print(
                f"| {m:g} M | {len(samples):,} | {old_index:.2f} s | {old_perm:.2f} s | "
                f"{old:.2f} s | {first:.2f} s | {restart * 1000:.1f} ms | {old / restart:,.0f}x |",
                flush=True,
            )


# ---------------------------------------------------------------- bytes read per rank on resume
def _train_once(data: str, out: str, tp: int) -> None:
    from pretrain.config import load_config
    from pretrain.trainer import train

    overrides = [
        f"data.path={data}",
        f"train.out_dir={out}",
        f"parallel.tp={tp}",
        "model.hidden=256",
        "model.heads=4",
        "model.layers=4",
        "model.max_seq_len=64",
        "data.seq_len=64",
        "train.micro_batch=2",
        f"train.global_batch={2 * 4 // tp}",
        "train.steps=1",
        "train.precision=fp32",
        "train.eval_every=100",
        "data.valid_fraction=0",
    ]
    train(load_config(REPO / "configs" / "tiny.yaml", overrides))


def resume_bytes() -> None:
    from pretrain.checkpoint import _model_file, _optimizer_file, _ShardedReader, read_train_state
    from tests.distributed.harness import run_distributed

    print(
        "| saved and resumed at | rank | old: read per rank | new: read per rank | "
        "the rank's own files | old / new |"
    )
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_synthetic(data, 20_000)
        for tp in (1, 2, 4):
            out = Path(tmp) / f"tp{tp}"
            if tp == 1:
                _train_once(str(data), str(out), 1)
            else:
                run_distributed(_train_once, tp, str(data), str(out), tp, timeout_s=900)
            path = out / "checkpoints" / "step_000001"
            state = read_train_state(path)
            sharding = state["sharding"]
            for rank in range(tp):
                counts = {}
                for kind, names in (
                    ("model", lambda r: [_model_file(r)]),
                    ("optimizer", lambda r: [_optimizer_file(r)]),
                ):
                    old, new = _ShardedReader(path, names), _ShardedReader(path, names)
                    for key in old.keys():
                        param = key.split("::", 1)[0]
                        old.whole(key, param)
                        like = new.index[rank][key].get_slice(key)
                        split = None
                        if param in sharding:
                            split = {"dim": sharding[param]["dim"], "tp": tp}
                        shape = like.get_shape()
                        dtype = {"F32": torch.float32, "I64": torch.int64}.get(
                            like.get_dtype(), torch.float32
                        )
                        new.local(key, param, torch.empty(shape, dtype=dtype), split, rank)
                    counts[kind] = (old.bytes_read, new.bytes_read)
                old = sum(o for o, _ in counts.values())
                new = sum(n for _, n in counts.values())
                own = sum(
                    (path / f).stat().st_size for f in (_model_file(rank), _optimizer_file(rank))
                )
                print(
                    f"| tp {tp} | {rank} | {old / 1e6:.1f} MB | {new / 1e6:.1f} MB | "
                    f"{own / 1e6:.1f} MB | {old / new:.2f}x |",
                    flush=True,
                )


# ---------------------------------------------------------------- a step held up by a save
def save_block(repeats: int = 3) -> None:
    from pretrain.checkpoint import BackgroundWriter, take_snapshot, write_snapshot
    from pretrain.config import Config, MLMConfig, ModelConfig, resolve_model_shape
    from pretrain.masking import IGNORE
    from pretrain.model import build_model
    from pretrain.objectives import pretraining_loss
    from pretrain.optim import build_param_groups, optimizer_for_groups

    config = Config(model=ModelConfig(hidden=512, heads=8, layers=8, max_seq_len=128))
    shape = resolve_model_shape(config, 30_522)
    model = build_model(shape, "cpu")
    optimizer = optimizer_for_groups(
        build_param_groups(model, 0.01), "lamb", 1e-3, (0.9, 0.999), 1e-6, None
    )
    ids = torch.randint(5, 30_000, (8, 128))
    picked = torch.rand(ids.shape) < 0.15
    batch = {
        "input_ids": torch.where(picked, 4, ids),
        "token_type_ids": torch.zeros_like(ids),
        "attention_mask": torch.ones_like(ids),
        "labels": torch.where(picked, ids, IGNORE),
        "picked": picked,
    }

    def step() -> float:
        began = time.perf_counter()
        pretraining_loss(model, batch, MLMConfig(mode="sparse")).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - began

    step()  # optimizer state exists from here on
    params = sum(p.numel() for p in model.parameters())
    info = {"step": 0}
    rows = {"sync": [], "async": [], "step alone": [], "step during write": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "checkpoints"
        for r in range(repeats):
            rows["step alone"].append(step())
            began = time.perf_counter()
            write_snapshot(root, take_snapshot(2 * r, model, optimizer, info), keep=1)
            rows["sync"].append(time.perf_counter() - began)
            writer = BackgroundWriter()
            began = time.perf_counter()
            snapshot = take_snapshot(2 * r + 1, model, optimizer, info, copy=True)
            writer.start(lambda s=snapshot: write_snapshot(root, s, keep=1))
            rows["async"].append(time.perf_counter() - began)
            rows["step during write"].append(step())
            path, error = writer.wait()
            assert error is None, error
        size = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    median = {k: statistics.median(v) for k, v in rows.items()}
    print(f"model {params / 1e6:.1f} M parameters, checkpoint {size:.0f} MB; medians of {repeats}:")
    print(
        "| training held up by a save: sync | async | sync / async | "
        "a step alone | a step during the background write |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| {median['sync']:.2f} s | {median['async']:.3f} s | "
        f"{median['sync'] / median['async']:.0f}x | {median['step alone']:.2f} s | "
        f"{median['step during write']:.2f} s |"
    )
    print(json.dumps({k: [round(x, 3) for x in v] for k, v in rows.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    start = sub.add_parser("startup")
    start.add_argument(
        "--sentences",
        type=float,
        nargs="+",
        default=[0.1, 1, 10],
        help="corpus sizes in millions of sentences",
    )
    sub.add_parser("resume-bytes")
    sub.add_parser("save-block")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part == "startup":
        startup(args.sentences)
    elif args.part == "resume-bytes":
        resume_bytes()
    else:
        save_block()


if __name__ == "__main__":
    main()
