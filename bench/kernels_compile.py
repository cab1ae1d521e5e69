"""A training step with `train.compile=true` (model.compile()) against eager, at the tiny and
base widths, on the CPU (issue 6).

Run from the repository root (10-30 minutes on 2 busy cores, most of it compiling base):

    .venv/bin/python bench/kernels_compile.py
    .venv/bin/python bench/kernels_compile.py --sizes tiny --steps 10

A step is what pretrain.trainer does per micro-batch, minus data loading: forward under bf16
autocast (the configs' precision), the dense-MLM loss (`pretraining_loss`: the MLM head and the
chunked linear + cross-entropy run outside the compiled forward, as in the trainer), backward,
gradient clipping and LAMB. Batches are random token sequences masked by the real
`mask_tokens` (dense, mask rate 0.15). tiny: 2 layers x 128, vocabulary 8192, batch 32 x 128
(configs/tiny.yaml's batch); base: 12 x 768, vocabulary 30522, batch 8 x 128.

Two models with the same initial weights, one compiled with `model.compile()` exactly as the
trainer does; the first `--warmup` steps of each (compilation for the compiled one) are timed
separately; then the two alternate step by step for `--steps` steps, so the load of this
shared machine hits both alike, and the table gives median step times and their ratio.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import numpy as np
import torch
from torch._dynamo.utils import counters

from data_prep.shard_format import SPECIAL_TOKEN_COUNT
from pretrain.config import MLMConfig, ModelShape
from pretrain.masking import mask_tokens
from pretrain.model import build_model
from pretrain.objectives import pretraining_loss
from pretrain.optim import build_optimizer, clip_grad_norm_

SIZES = {  # name: (layers, hidden, heads, vocab, batch)
    "tiny": (2, 128, 2, 8192, 32),
    "base": (12, 768, 12, 30522, 8),
}
SEQ = 128


def make_batch(vocab: int, batch: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    mlm = MLMConfig(mode="dense", mask_rate=0.15)
    samples = []
    for _ in range(batch):
        tokens = rng.integers(SPECIAL_TOKEN_COUNT, vocab, SEQ)
        tokens[0], tokens[-1] = 2, 3  # [CLS] ... [SEP]
        samples.append(mask_tokens(tokens, rng, mlm, vocab))
    return {
        "input_ids": torch.from_numpy(np.stack([s.input_ids for s in samples])),
        "token_type_ids": torch.zeros(batch, SEQ, dtype=torch.int64),
        "attention_mask": torch.ones(batch, SEQ, dtype=torch.int64),
        "labels": torch.from_numpy(np.stack([s.labels for s in samples])),
        "picked": torch.from_numpy(np.stack([s.picked for s in samples])),
    }


def bench_size(name: str, steps: int, warmup: int) -> dict[str, float]:
    layers, hidden, heads, vocab, batch = SIZES[name]
    shape = ModelShape(
        layers=layers,
        hidden=hidden,
        heads=heads,
        ffn_hidden=4 * hidden,
        vocab_size=vocab,
        max_seq_len=512,
        norm="post",
        dropout=0.1,
        pair_head=False,
    )
    torch.manual_seed(0)
    eager = build_model(shape)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    mlm = MLMConfig(mode="dense", mask_rate=0.15)
    rng = np.random.default_rng(0)
    batches = [make_batch(vocab, batch, rng) for _ in range(4)]
    runs = {}
    for label, model in (("eager", eager), ("compiled", compiled)):
        opt = build_optimizer(model, "lamb", lr=1e-3, weight_decay=0.01)
        params = [p for p in model.parameters() if p.requires_grad]
        runs[label] = (model, opt, params)

    def step(label: str, i: int) -> float:
        model, opt, params = runs[label]
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = pretraining_loss(model, batches[i % len(batches)], mlm)
        out.loss.backward()
        clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    counters.clear()
    first = {label: sum(step(label, i) for i in range(warmup)) for label in runs}
    graph_breaks = sum(counters["graph_break"].values())
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for i in range(steps):
        for label in ("eager", "compiled") if i % 2 == 0 else ("compiled", "eager"):
            times[label].append(step(label, warmup + i))
    ratios = [e / c for e, c in zip(times["eager"], times["compiled"], strict=True)]
    result = {
        "eager_s": statistics.median(times["eager"]),
        "compiled_s": statistics.median(times["compiled"]),
        "ratio": statistics.median(ratios),
        "eager_warmup_s": first["eager"],
        "compile_warmup_s": first["compiled"],
        "graph_breaks": graph_breaks,
        "tokens": batch * SEQ,
    }
    print(f"{name}: {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    results = {name: bench_size(name, args.steps, args.warmup) for name in args.sizes}
    print()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 autocast, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        "| width | tokens/step | eager step (s) | compiled step (s) | eager / compiled | "
        "first steps: eager / compiled (s) | graph breaks |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['tokens']} | {r['eager_s']:.3f} | {r['compiled_s']:.3f} | "
            f"{r['ratio']:.2f}x | {r['eager_warmup_s']:.1f} / {r['compile_warmup_s']:.1f} | "
            f"{r['graph_breaks']} |"
        )


if __name__ == "__main__":
    main()
