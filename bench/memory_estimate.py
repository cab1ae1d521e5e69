"""The memory estimator (pretrain/memory.py) against real CPU runs, against Megatron-LM's formula,
and the fitted layouts of the cluster files.

    .venv/bin/python -m bench.memory_estimate cpu        # measured vs estimated, ~5 min on 2 cores
    .venv/bin/python -m bench.memory_estimate cpu --precision bf16   # the same under bf16 autocast
    .venv/bin/python -m bench.memory_estimate megatron   # GPU activations vs Korthikanti et al.
    .venv/bin/python -m bench.memory_estimate layouts configs/cluster/abci2.yaml

`cpu` runs a few real training steps (the trainer's own pieces: model, recompute, LAMB, dense
MLM loss, clipping; fp32, or the forward under CPU bf16 autocast as the trainer runs it, where
the MLM head's GEMMs are half) in a fresh process per shape and recompute mode, with glibc told to
serve every allocation above 64 KiB by mmap so that freed tensors leave the resident set. The
measured peak is the peak of live tensor storage (every op's outputs are counted until their
storage is freed, like CUDA's max_memory_allocated); beside it, the process's high-water resident
memory (VmHWM) minus its resident memory just before the model is built, which adds oneDNN's
scratch buffers and malloc's overhead. The estimate is `estimate_memory(..., device="cpu")`.

`layouts` prints the `layouts:` section of a cluster file (paste it over the old one): for each
shipped large config at sequence length 128 and 512, the smallest node count at which a layout
leaves 10% of the GPU free, and that layout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[1]
GiB = 1024**3

# (name, layers, hidden, heads, seq_len, micro_batch), vocabulary 30522, post-LN, dense MLM:
# each holds 0.3-1.6 GB of states and activations, far above the ~0.3 GB idle process.
CPU_SHAPES = [
    ("A", 4, 256, 4, 128, 32),
    ("B", 2, 512, 8, 256, 8),
    ("C", 6, 384, 6, 64, 48),
]
STEPS = 2


def _status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


class TensorPeak(TorchDispatchMode):
    """Live bytes of every tensor storage the ops under it create (freed ones drop out when
    their storage dies), and the peak: the CPU counterpart of CUDA's max_memory_allocated."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.seen: set[int] = set()

    def _add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if key in self.seen or size == 0:
            return
        self.seen.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)

        def freed() -> None:
            self.live -= size
            self.seen.discard(key)

        weakref.finalize(storage, freed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._add(item)
        return out


def measure_worker(
    layers: int, hidden: int, heads: int, seq: int, batch: int, recompute: str, precision: str
) -> None:
    """Runs in its own process: a few training steps; prints the peaks over the baseline."""
    from pretrain.config import MLMConfig, ModelShape
    from pretrain.model import apply_recompute, build_model
    from pretrain.objectives import pretraining_loss
    from pretrain.optim import build_param_groups, clip_grad_norm_, optimizer_for_groups
    from pretrain.precision import autocast_context

    torch.manual_seed(0)
    vocab = 30522
    ids = torch.randint(5, vocab, (batch, seq))
    data = {
        "input_ids": ids,
        "token_type_ids": torch.zeros_like(ids),
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
        "picked": torch.rand(batch, seq) < 0.15,
    }
    mlm = MLMConfig(mode="dense")
    baseline = _status_bytes("VmRSS")
    tracker = TensorPeak()
    with tracker:
        shape = ModelShape(layers, hidden, heads, 4 * hidden, vocab, 512, "post", 0.1, False)
        model = build_model(shape)
        apply_recompute(model, recompute)
        model.train()
        optimizer = optimizer_for_groups(
            build_param_groups(model, 0.01), "lamb", 1e-3, (0.9, 0.999), 1e-6, None
        )
        params = [p for p in model.parameters() if p.requires_grad]
        for _ in range(STEPS):  # the second step is the first with LAMB's state
            with autocast_context(precision, "cpu"):
                loss = pretraining_loss(model, data, mlm).loss
            loss.backward()
            clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    rss = _status_bytes("VmHWM") - baseline
    print(json.dumps({"tensor_peak": tracker.peak, "rss_peak": rss}))


def measure(
    layers: int, hidden: int, heads: int, seq: int, batch: int, recompute: str, precision: str
) -> dict[str, int]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    args = [str(a) for a in (layers, hidden, heads, seq, batch)]
    out = subprocess.run(
        [sys.executable, "-m", "bench.memory_estimate", "_worker", *args, recompute, precision],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_table(precision: str) -> None:
    from pretrain.config import ModelShape
    from pretrain.memory import Layout, estimate_memory

    print(
        "| shape | L | H | heads | S | B | recompute | estimated MB | tensor peak MB | "
        "est/tensor | RSS peak - baseline MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for name, layers, hidden, heads, seq, batch in CPU_SHAPES:
        shape = ModelShape(layers, hidden, heads, 4 * hidden, 30522, 512, "post", 0.1, False)
        for recompute in ("none", "selective", "full"):
            layout = Layout(
                seq_len=seq,
                micro_batch=batch,
                recompute=recompute,
                precision=precision,
                device="cpu",
            )
            estimated = estimate_memory(shape, layout).total
            measured = measure(layers, hidden, heads, seq, batch, recompute, precision)
            print(
                f"| {name} | {layers} | {hidden} | {heads} | {seq} | {batch} | {recompute} | "
                f"{estimated / 1e6:.0f} | {measured['tensor_peak'] / 1e6:.0f} | "
                f"{estimated / measured['tensor_peak']:.3f} | {measured['rss_peak'] / 1e6:.0f} |",
                flush=True,
            )


# The shipped configs of BERT-large and larger (kasagi-dense is xlarge with dense MLM at 15%).
LARGE_CONFIGS = ("large", "xlarge", "3.9b", "kasagi-dense")
# (config, seq_len, micro_batch, tp) for the comparison with Megatron-LM's formula.
GPU_SHAPES = [
    ("large", 128, 64, 1),
    ("large", 512, 16, 1),
    ("xlarge", 128, 32, 2),
    ("xlarge", 512, 8, 2),
    ("3.9b", 128, 16, 4),
    ("3.9b", 512, 4, 4),
]


def megatron_layer_bytes(s: int, b: int, h: int, a: int, t: int, recompute: str) -> float:
    """Activation bytes per transformer layer, Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", arXiv:2205.05198, Table 2), 16-bit activations,
    tensor parallel without sequence parallelism: sbh(10 + 24/t + 5as/(ht)); selective
    recomputation drops the attention term; full recomputation keeps the layer input, 2sbh."""
    if recompute == "full":
        return 2 * s * b * h
    attention = 5 * a * s / (h * t) if recompute == "none" else 0.0
    return s * b * h * (10 + 24 / t + attention)


def megatron_table() -> None:
    from pretrain.config import load_config, resolve_model_shape
    from pretrain.memory import DEFAULT_VOCAB, Layout, layer_activation_bytes

    print(
        "| config | S | b | tp | recompute | ours MiB/layer | Megatron MiB/layer | ours/Megatron |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for name, seq_len, batch, tp in GPU_SHAPES:
        shape = resolve_model_shape(load_config(REPO / "configs" / f"{name}.yaml"), DEFAULT_VOCAB)
        for recompute in ("none", "selective", "full"):
            layout = Layout(seq_len=seq_len, micro_batch=batch, tp=tp, recompute=recompute)
            if recompute == "full":  # the layer's fp32 input; one layer reruns at a time
                ours = seq_len * batch * 4 * shape.hidden
            else:
                ours = layer_activation_bytes(shape, layout)
            theirs = megatron_layer_bytes(seq_len, batch, shape.hidden, shape.heads, tp, recompute)
            print(
                f"| {name} | {seq_len} | {batch} | {tp} | {recompute} | {ours / 2**20:.0f} | "
                f"{theirs / 2**20:.0f} | {ours / theirs:.2f} |"
            )


def layouts_yaml(cluster: Path) -> str:
    """The `layouts:` section for a cluster file, from its `hardware:` section."""
    import yaml

    from pretrain.config import load_config, resolve_model_shape
    from pretrain.memory import DEFAULT_VOCAB, GiB, fit_layout, layout_for

    hardware = yaml.safe_load(cluster.read_text(encoding="utf-8"))["hardware"]
    memory = int(hardware["gpu_memory_gib"] * GiB)
    lines = [
        "# Generated by: python -m bench.memory_estimate layouts " + cluster.name,
        "# Smallest node count at which each shipped config leaves >= 10% of the GPU free",
        f"# (estimated for a {DEFAULT_VOCAB}-token vocabulary, each config's MLM mode and mask",
        "# rate, precision and global batch), and the layout chosen there; bert-launch adds its",
        "# keys to the job.",
        "layouts:",
    ]
    for name in LARGE_CONFIGS:
        lines.append(f"  {name}:")
        for seq_len in (128, 512):
            config = load_config(REPO / "configs" / f"{name}.yaml", [f"data.seq_len={seq_len}"])
            shape = resolve_model_shape(config, config.model.vocab_size or DEFAULT_VOCAB)
            fitted = fit_layout(
                shape,
                layout_for(config, 1, "cuda"),
                hardware["gpus_per_node"],
                memory,
                config.train.global_batch,
            )
            if fitted is None:
                raise SystemExit(f"{name} at seq {seq_len} fits no layout on {cluster}")
            keys = ", ".join(f"{k}: {v}" for k, v in fitted.overrides().items())
            lines.append(
                f"    seq{seq_len}: {{min_nodes: {fitted.nodes}, {keys}, "
                f"estimate_gib: {fitted.estimate.total / GiB:.1f}}}"
            )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        *numbers, recompute, precision = sys.argv[2:]
        measure_worker(*(int(n) for n in numbers), recompute, precision)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["cpu", "megatron", "layouts"])
    parser.add_argument("cluster", nargs="?", help="layouts: the cluster file")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32", help="cpu: the runs' precision"
    )
    args = parser.parse_args()
    if args.what == "cpu":
        cpu_table(args.precision)
    elif args.what == "megatron":
        megatron_table()
    elif args.what == "layouts":
        if not args.cluster:
            parser.error("layouts needs the cluster file")
        print(layouts_yaml(Path(args.cluster)))


if __name__ == "__main__":
    main()
