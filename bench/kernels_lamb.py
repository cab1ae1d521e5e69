"""Multi-tensor LAMB (`kernels.lamb_step`) against a per-tensor loop, over BERT-base's parameter
set on the CPU (issue 6).

Run from the repository root (1-3 minutes on 2 cores; ~3 GB of memory):

    .venv/bin/python bench/kernels_lamb.py
    .venv/bin/python bench/kernels_lamb.py --rounds 5

The parameters have BERT-base's shapes (pretrain.model at model.size=base, vocabulary 30522,
post-LN, NSP head: ~110M values in ~200 tensors), fp32, with random gradients, split into the
two groups `pretrain.optim` uses (decayed matrices, undecayed biases and norms). "multi-tensor"
is `kernels.lamb_step`, which on the CPU runs the `torch._foreach_*` reference (the maths of
`pretrain.optim.Lamb`); "per-tensor loop" is the same update written one tensor at a time
with ordinary in-place ops, the way most LAMB implementations are written. Both run on the
same tensors in alternating order, `--rounds` times; the table gives median step times (wall,
and process CPU time, which other jobs' load disturbs less) and the medians of the per-round
ratios. A correctness check first runs one step of each on copies
of the same state and reports the largest difference.

On the CPU the step is memory-bound and torch's foreach ops are themselves per-tensor loops, so
no speed-up is expected here: the multi-tensor form exists for GPU launch counts, which the
table lists per step (per-tensor: ~12 launches per tensor; foreach: a few per op and group;
Triton: 2 per group plus the norms).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch

import kernels
from pretrain.config import ModelShape
from pretrain.model import build_model
from pretrain.optim import build_param_groups

LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-6, 0.01


def per_tensor_loop(group: dict, step: int) -> None:
    """The LAMB update of kernels.lamb (same maths), one tensor at a time."""
    beta1, beta2 = BETAS
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    for p, g, m, v in zip(group["params"], group["grads"], group["m"], group["v"], strict=True):
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        u = (m / bc1) / ((v / bc2).sqrt_().add_(EPS))
        if group["weight_decay"] != 0:
            u.add_(p, alpha=group["weight_decay"])
        p_norm = torch.linalg.vector_norm(p)
        u_norm = torch.linalg.vector_norm(u)
        trust = torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, 1.0)
        p.add_(u * (trust * -LR))


def multi_tensor(group: dict, step: int) -> None:
    n = len(group["params"])
    kernels.lamb_step(
        group["params"],
        group["grads"],
        group["m"],
        group["v"],
        [step] * n,
        lr=LR,
        betas=BETAS,
        eps=EPS,
        weight_decay=group["weight_decay"],
    )


def make_groups(seed: int = 0) -> list[dict]:
    shape = ModelShape(
        layers=12,
        hidden=768,
        heads=12,
        ffn_hidden=3072,
        vocab_size=30522,
        max_seq_len=512,
        norm="post",
        dropout=0.1,
        pair_head=True,
    )
    model = build_model(shape, "meta")
    g = torch.Generator().manual_seed(seed)
    groups = []
    for spec in build_param_groups(model, WEIGHT_DECAY):
        params = [torch.randn(p.shape, generator=g) * 0.02 for p in spec["params"]]
        groups.append(
            {
                "weight_decay": spec["weight_decay"],
                "params": params,
                "grads": [torch.randn(p.shape, generator=g) * 1e-3 for p in params],
                "m": [torch.zeros_like(p) for p in params],
                "v": [torch.zeros_like(p) for p in params],
            }
        )
    return groups


def check(groups: list[dict], tensors: int = 12) -> float:
    """Largest |difference| after one step of each from the same state (first tensors only)."""
    worst = 0.0
    for group in groups:
        sub = {k: v[:tensors] if isinstance(v, list) else v for k, v in group.items()}
        a = {k: [t.clone() for t in v] if isinstance(v, list) else v for k, v in sub.items()}
        b = {k: [t.clone() for t in v] if isinstance(v, list) else v for k, v in sub.items()}
        per_tensor_loop(a, 1)
        multi_tensor(b, 1)
        for x, y in zip(a["params"] + a["m"] + a["v"], b["params"] + b["m"] + b["v"], strict=True):
            worst = max(worst, float((x - y).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    groups = make_groups()
    n_tensors = sum(len(g["params"]) for g in groups)
    n_values = sum(p.numel() for g in groups for p in g["params"])
    worst = check(groups)
    variants = {"per-tensor loop": per_tensor_loop, "multi-tensor": multi_tensor}
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    ratios, cpu_ratios = [], []
    for round_ in range(args.rounds):
        order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
        this_round, this_cpu = {}, {}
        for name in order:
            start, cpu_start = time.perf_counter(), time.process_time()
            for group in groups:
                variants[name](group, round_ + 1)
            this_round[name] = time.perf_counter() - start
            this_cpu[name] = time.process_time() - cpu_start
            times[name].append(this_round[name])
            cpu[name].append(this_cpu[name])
        ratios.append(this_round["per-tensor loop"] / this_round["multi-tensor"])
        cpu_ratios.append(this_cpu["per-tensor loop"] / this_cpu["multi-tensor"])
        print(
            f"round {round_ + 1}: "
            + ", ".join(f"{k} {v:.2f} s ({this_cpu[k]:.2f} s CPU)" for k, v in this_round.items())
        )

    print()
    print(
        f"BERT-base parameter set: {n_tensors} tensors, {n_values / 1e6:.1f}M values, fp32, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
        f"one step of each from the same state differs by at most {worst:.1e}"
    )
    print("| variant | step wall time (s) | step CPU time (s) | GPU launches per step |")
    print("|---|---:|---:|---|")
    launches = {
        "per-tensor loop": f"~{12 * n_tensors} (about 12 per tensor)",
        "multi-tensor": "foreach: ~12 multi-tensor ops per group; Triton: 2 per group + norms",
    }
    for name in variants:
        print(
            f"| {name} | {statistics.median(times[name]):.2f} | "
            f"{statistics.median(cpu[name]):.2f} | {launches[name]} |"
        )
    print(
        f"per-tensor loop / multi-tensor, median of per-round ratios: wall "
        f"{statistics.median(ratios):.2f}x, CPU {statistics.median(cpu_ratios):.2f}x"
    )


if __name__ == "__main__":
    main()
