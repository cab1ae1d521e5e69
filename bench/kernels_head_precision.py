"""The MLM head in bf16 autocast against fp32 on the CPU, and its predicted share of a training
step on V100 and H100 before and after its GEMMs left fp32 (issue 16).

Run from the repository root (a few minutes on 2 busy cores):

    .venv/bin/python bench/kernels_head_precision.py               # measure, then predict
    .venv/bin/python bench/kernels_head_precision.py --predict-only

Measured: the head as the trainer runs it (pretrain/objectives.py): MLMHead.transform (dense
H x H, GELU, LayerNorm) on the scored rows, then `kernels.linear_cross_entropy` against the tied
[30522, H] word embedding, forward and backward, at base (H 768) and large (H 1024) widths, for
dense MLM (every position of 16 x 128 tokens scored, weights 1 / 0.1 as mlm.visible_weight) and
sparse MLM (the 15% picked positions), in fp32 and under bf16 autocast. Each variant runs in a
fresh subprocess: the rise of the peak RSS (getrusage ru_maxrss) over one forward + backward,
then the median process CPU time (all threads; less sensitive than wall time to the load of other
jobs on this shared machine) and wall time of `--repeats` more.

Predicted (not measured; no GPU here): the step time of each part is its FLOPs (pretrain/model.py
`flops_per_step`'s counting) over the peak rate of the dtype it runs in (pretrain/devices.py
PEAK_TFLOPS, NVIDIA datasheets) times one efficiency for the whole step: the MFU implied by
NVIDIA's published BERT-large phase-1 throughput (DeepLearningExamples PyTorch BERT README:
224 seq/s on one V100 32 GB with AMP; 574 seq/s per GPU on 8 A100 80 GB, whose 44% we also
take for H100 for want of a published H100 figure). "Before": the head's GEMMs in fp32 (no
TF32); "after": in the autocast dtype (fp16 on V100, bf16 on H100). The model ignores memory
traffic and the softmax passes, which the chunked head adds in either dtype.
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
VOCAB = 30522
WIDTHS = {"base": (12, 768), "large": (24, 1024)}  # name: (layers, hidden)
BATCH, SEQ, MASK_RATE, VISIBLE_WEIGHT = 16, 128, 0.15, 0.1


def _child(width: str, mode: str, precision: str, repeats: int) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    import kernels
    from pretrain.config import ModelShape
    from pretrain.model import MLMHead

    layers, hidden = WIDTHS[width]
    shape = ModelShape(
        layers=layers,
        hidden=hidden,
        heads=hidden // 64,
        ffn_hidden=4 * hidden,
        vocab_size=VOCAB,
        max_seq_len=512,
        norm="post",
        dropout=0.0,
        pair_head=False,
    )
    torch.manual_seed(0)
    head = MLMHead(shape)
    decoder = (torch.randn(VOCAB, hidden) * 0.02).requires_grad_()
    positions = BATCH * SEQ
    rows = positions if mode == "dense" else int(positions * MASK_RATE)
    states = torch.randn(rows, hidden).requires_grad_()
    target = torch.randint(0, VOCAB, (rows,))
    weight = None
    if mode == "dense":
        weight = torch.where(torch.rand(rows) < MASK_RATE, 1.0, VISIBLE_WEIGHT)

    def step() -> tuple[float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = kernels.linear_cross_entropy(
                head.transform(states),
                decoder,
                target,
                bias=head.logit_bias(),
                position_weight=weight,
            )
        loss.backward()
        for t in (states, decoder, *head.parameters()):
            t.grad = None
        return time.perf_counter() - start, time.process_time() - cpu_start

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    times = [step() for _ in range(repeats)]
    return {
        "peak_mib": peak_kib / 1024,
        "wall_s": statistics.median(t[0] for t in times),
        "cpu_s": statistics.median(t[1] for t in times),
        "rows": rows,
    }


def measure(repeats: int) -> None:
    variants = [(w, m, p) for w in WIDTHS for m in ("dense", "sparse") for p in ("fp32", "bf16")]
    results = {}
    for width, mode, precision in variants:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", width, mode, precision, str(repeats)],
            capture_output=True,
            text=True,
            check=True,
        )
        results[(width, mode, precision)] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{width} {mode} {precision}: {results[(width, mode, precision)]}", flush=True)
    print()
    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        "| width | MLM | scored rows | CPU time fp32 / bf16 (s) | fp32 / bf16 | "
        "wall fp32 / bf16 (s) | peak extra fp32 / bf16 (MiB) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for width in WIDTHS:
        for mode in ("dense", "sparse"):
            f, b = results[(width, mode, "fp32")], results[(width, mode, "bf16")]
            print(
                f"| {width} | {mode} | {f['rows']} | {f['cpu_s']:.2f} / {b['cpu_s']:.2f} | "
                f"{f['cpu_s'] / b['cpu_s']:.2f}x | {f['wall_s']:.2f} / {b['wall_s']:.2f} | "
                f"{f['peak_mib']:.0f} / {b['peak_mib']:.0f} |"
            )


# NVIDIA DeepLearningExamples PyTorch BERT-large, phase 1 (S 128), AMP, sequences/s per GPU.
PUBLISHED = {"V100-SXM2": (224.0, "fp16"), "H100-SXM": (574.0, "bf16")}
# The A100 80 GB figure stands in for H100 (same efficiency assumed): its peak is A100's.
PUBLISHED_PEAK = {"V100-SXM2": "V100-SXM2", "H100-SXM": "A100-80GB"}


def predict() -> None:
    sys.path.insert(0, str(REPO))
    from pretrain.config import ModelShape
    from pretrain.devices import PEAK_TFLOPS
    from pretrain.model import flops_per_step

    large = ModelShape(
        layers=24,
        hidden=1024,
        heads=16,
        ffn_hidden=4096,
        vocab_size=VOCAB,
        max_seq_len=512,
        norm="post",
        dropout=0.0,
        pair_head=False,
    )
    print(
        "| GPU | efficiency (from) | width | MLM | head share before | after | "
        "step time after / before |"
    )
    print("|---|---|---|---|---:|---:|---:|")
    for gpu, (seq_per_s, half) in PUBLISHED.items():
        # Efficiency: achieved FLOP/s of the published run over the peak of its GPU.
        achieved = seq_per_s * flops_per_step(large, SEQ, 1, MASK_RATE * SEQ)
        efficiency = achieved / (PEAK_TFLOPS[PUBLISHED_PEAK[gpu]][half] * 1e12)
        peaks = PEAK_TFLOPS[gpu]
        for width, (layers, hidden) in WIDTHS.items():
            shape = ModelShape(
                layers=layers,
                hidden=hidden,
                heads=hidden // 64,
                ffn_hidden=4 * hidden,
                vocab_size=VOCAB,
                max_seq_len=512,
                norm="post",
                dropout=0.0,
                pair_head=False,
            )
            for mode, scored in (("dense", SEQ - 2), ("sparse", MASK_RATE * SEQ)):
                total = flops_per_step(shape, SEQ, 1, scored)
                head = total - flops_per_step(shape, SEQ, 1, 0)
                body_s = (total - head) / (peaks[half] * 1e12 * efficiency)
                before_s = head / (peaks["fp32"] * 1e12 * efficiency)
                after_s = head / (peaks[half] * 1e12 * efficiency)
                print(
                    f"| {gpu} | {efficiency:.0%} ({seq_per_s:.0f} seq/s on "
                    f"{PUBLISHED_PEAK[gpu]}) | {width} | {mode} | "
                    f"{before_s / (body_s + before_s):.0%} | {after_s / (body_s + after_s):.0%} | "
                    f"{(body_s + after_s) / (body_s + before_s):.2f} |"
                )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        width, mode, precision, repeats = sys.argv[2:6]
        print(json.dumps(_child(width, mode, precision, int(repeats))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--predict-only", action="store_true")
    args = parser.parse_args()
    if not args.predict_only:
        measure(args.repeats)
        print()
    predict()


if __name__ == "__main__":
    main()
