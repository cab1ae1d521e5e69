"""Peak memory and time of the fused (chunked) linear + cross-entropy against full logits +
F.cross_entropy, forward and backward, on the CPU at dense-MLM shapes (issue 6).

Run from the repository root (5-15 minutes on 2 busy cores: each pass is ~1.6 TFLOP of GEMMs):

    .venv/bin/python bench/kernels_cross_entropy.py                    # 8192 x 1024 x 32768
    .venv/bin/python bench/kernels_cross_entropy.py --tokens 2048      # smaller, quicker

Both variants compute the same thing: loss = mean CE of hidden @ weight.T + bias against random
targets (every position scored, as dense MLM does), then backward to hidden, weight and bias,
all fp32. "full" materialises the [tokens, V] logits and calls F.cross_entropy; "fused" is
`kernels.linear_cross_entropy`, which on the CPU is the chunked PyTorch reference (the same path
V100 takes; chunks of 2**24 / V rows).

Memory: each measurement is a fresh subprocess. After torch is imported and the inputs exist,
it reads the process's peak resident set size (getrusage ru_maxrss, a high-water mark kept by
the kernel), runs forward + backward once, and reads it again: the difference is the extra
memory the operation needed at its peak, whatever allocated it (tensors, autograd buffers,
oneDNN/MKL workspaces), with nothing sampled and nothing instrumented. Large tensors are
mmap'ed by glibc and returned on free, so the RSS follows what is live. The grads (hidden,
weight, bias: 160 MB at the default shape) are live at the end and count for both variants.

Time: the same subprocess then times `--repeats` more forward + backward passes (grads cleared
in between) and reports their median wall time and process CPU time (all threads; less
sensitive than wall time to other jobs' load, which here varies several-fold within minutes).
Variants alternate (full, fused, full, fused, ...) for
`--rounds` rounds so that load from other jobs on this shared machine hits both; the table gives
medians over rounds. Speed ratio = full time / fused time (> 1: fused faster).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _child(variant: str, tokens: int, hidden: int, vocab: int, repeats: int) -> dict:
    sys.path.insert(0, str(REPO))
    import torch
    import torch.nn.functional as F

    import kernels

    torch.manual_seed(0)
    h = torch.randn(tokens, hidden).requires_grad_()
    w = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    b = torch.zeros(vocab).requires_grad_()
    target = torch.randint(0, vocab, (tokens,))

    def step() -> float:
        if variant == "full":
            loss = F.cross_entropy(h @ w.T + b, target)
        else:
            loss = kernels.linear_cross_entropy(h, w, target, bias=b)
        loss.backward()
        return float(loss)

    def clear() -> None:
        h.grad = w.grad = b.grad = None

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    loss = step()
    first = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu_times = [], []
    for _ in range(repeats):
        clear()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "variant": variant,
        "loss": loss,
        "peak_extra_mib": (peak - before) / 1024,
        "first_s": first,
        "median_s": statistics.median(times) if times else first,
        "median_cpu_s": statistics.median(cpu_times) if cpu_times else float("nan"),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", choices=["full", "fused"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.tokens, args.hidden, args.vocab, args.repeats)
    if args.child:
        print(json.dumps(_child(args.child, *shape)))
        return

    runs: dict[str, list[dict]] = {"full": [], "fused": []}
    for round_ in range(args.rounds):
        for variant in ("full", "fused"):
            cmd = [sys.executable, __file__, "--child", variant]
            cmd += ["--tokens", str(args.tokens), "--hidden", str(args.hidden)]
            cmd += ["--vocab", str(args.vocab), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            runs[variant].append(result)
            print(
                f"round {round_ + 1} {variant:>5}: peak +{result['peak_extra_mib']:.0f} MiB, "
                f"first {result['first_s']:.2f} s, then {result['median_s']:.2f} s "
                f"({result['median_cpu_s']:.2f} s CPU)",
                flush=True,
            )

    def med(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[variant])

    losses = {v: runs[v][0]["loss"] for v in runs}
    assert abs(losses["full"] - losses["fused"]) < 1e-3 * abs(losses["full"]), losses
    full_mem, fused_mem = med("full", "peak_extra_mib"), med("fused", "peak_extra_mib")
    full_t, fused_t = med("full", "median_s"), med("fused", "median_s")
    full_cpu, fused_cpu = med("full", "median_cpu_s"), med("fused", "median_cpu_s")
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print()
    print(
        f"tokens {args.tokens} x hidden {args.hidden} x vocab {args.vocab}, fp32, forward + "
        f"backward, {runs['full'][0]['threads']} threads, load average "
        f"{os.getloadavg()[0]:.1f}; one fp32 logits tensor = {logits_mib:.0f} MiB"
    )
    print("| variant | peak extra memory (MiB) | wall time fwd+bwd (s) | CPU time (s) |")
    print("|---|---:|---:|---:|")
    print(f"| full logits + F.cross_entropy | {full_mem:.0f} | {full_t:.2f} | {full_cpu:.2f} |")
    print(
        f"| kernels.linear_cross_entropy (chunked) | {fused_mem:.0f} | {fused_t:.2f} | "
        f"{fused_cpu:.2f} |"
    )
    print(
        f"memory: {full_mem / fused_mem:.1f}x lower; speed (full / fused): wall "
        f"{full_t / fused_t:.2f}x, CPU {full_cpu / fused_cpu:.2f}x "
        f"(goal: >= 4x lower memory at >= 0.9x speed)"
    )


if __name__ == "__main__":
    main()
