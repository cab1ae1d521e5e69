"""`bert-plan`: before booking nodes, which layout fits, how long a step takes, how long the run
takes and what it costs in GPU-hours.

    bert-plan --config configs/xlarge.yaml --cluster abci2 --nodes 192 --tokens 30e9 \\
        train.global_batch=12288
    bert-plan --config configs/3.9b.yaml --cluster abci3 --nodes 8 --walltime 72:00:00 \\
        --emit pbs -- --group gXXXXX > job.sh
    bert-plan --config configs/base.yaml --cluster cpu --measure     # calibrate this CPU

For a model config (with `key=value` overrides, as bert-train takes them) and a cluster (a
built-in name or a cluster file, as bert-launch takes it), the search costs every layout on the
given nodes: tensor parallelism dividing the heads and the MLP width inside a node, ZeRO-1 on
and off, recomputation none/selective/full, micro-batches in powers of two, and the gradient
accumulation that makes the config's global batch. Memory comes from pretrain/memory.py, the
step time from pretrain/plan_model.py. The fastest layout that leaves 10% of the GPU free is
chosen; every other one says why it lost. Without --nodes, the smallest power-of-two node count
that fits (and, with --walltime, finishes within one wall time) is planned.

GPU figures are predictions: the efficiency constant of each GPU kind is fitted on one published
BERT throughput and checked against the others (pretrain/plan_published.py, docs/benchmarks.md).
On a CPU the rates come from `--measure`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from launch.errors import LaunchError
from launch.fit import Hardware, pop_fit_sections, read_cluster_file, resolve_cluster
from launch.scripts import walltime_seconds
from pretrain.config import ConfigError, ModelShape, load_config, resolve_model_shape
from pretrain.devices import PEAK_TFLOPS, gpu_kind
from pretrain.memory import (
    DEFAULT_VOCAB,
    HEADROOM,
    RECOMPUTE_COST,
    GiB,
    Layout,
    MemoryEstimate,
    candidate_layouts,
    estimate_memory,
    parameter_counts,
)
from pretrain.plan_model import Rates, StepTime, model_flops, step_time
from pretrain.plan_published import fitted_efficiency, gpu_rates

MICRO_BATCHES = tuple(2**i for i in range(11))  # 1 ... 1024
NODE_COUNTS = tuple(2**i for i in range(13))  # 1 ... 4096, searched without --nodes
TERMS = {
    "compute": "compute",
    "tp_comm": "tensor-parallel communication",
    "dp_comm": "exposed data-parallel communication",
    "optimizer": "optimizer step",
}


@dataclass(frozen=True)
class Cluster:
    """A cluster file's name, path, hardware and what bert-plan needs besides."""

    name: str
    path: Path
    hardware: Hardware
    kind: str
    """pretrain/devices.py's GPU kind, or "cpu"."""
    stop_margin_s: int

    @property
    def rank_memory_bytes(self) -> int:
        """Memory one rank may use: its GPU's, or on a CPU node its share of the host's."""
        total = self.hardware.gpu_memory_gib * GiB
        return int(total / self.hardware.gpus_per_node if self.kind == "cpu" else total)


def load_cluster(name: str) -> Cluster:
    """The cluster for `--cluster NAME|FILE`; one-line errors for a missing or bad hardware."""
    path = resolve_cluster(name)
    data = read_cluster_file(path)
    hardware, _ = pop_fit_sections(data, str(path))
    if hardware is None:
        raise ConfigError(
            f"cluster file {path} has no hardware: section; bert-plan needs gpu, gpu_memory_gib, "
            "gpus_per_node, nvlink_gb_per_s and internode_gb_per_s"
        )
    kind = "cpu" if hardware.gpu == "cpu" else gpu_kind(hardware.gpu)
    if kind is None:
        raise ConfigError(
            f"cluster file {path}: hardware.gpu {hardware.gpu!r} is not a GPU bert-plan knows "
            f"({', '.join(PEAK_TFLOPS)}, or cpu)"
        )
    margin = data.get("stop_margin", 300)
    return Cluster(Path(name).stem, path, hardware, kind, int(margin))


def plan_precision(setting: str, kind: str) -> str:
    """What `train.precision` resolves to on this GPU kind (as bert-train resolves it there)."""
    if kind == "cpu":
        import torch

        from pretrain.precision import resolve_precision

        return resolve_precision(setting, torch.device("cpu"))[0]
    volta = kind == "V100-SXM2"
    if setting == "auto":
        return "fp16" if volta else "bf16"
    if setting == "bf16" and volta:
        raise ConfigError("train.precision=bf16 on V100 is emulated and slow: use auto or fp16")
    return setting


def cluster_rates(cluster: Cluster, precision: str, shape: ModelShape) -> tuple[Rates, str]:
    """The time model's rates on this cluster, and where its efficiency comes from."""
    hw = cluster.hardware
    if cluster.kind == "cpu":
        from pretrain.plan_measure import load_calibration

        calibration = load_calibration(cluster.name, precision, hw.gpus_per_node, shape)
        if calibration is None:
            raise ConfigError(
                f"no calibration of this CPU for cluster {cluster.name} in {precision}: run "
                f"bert-plan --config CONFIG --cluster {cluster.name} --measure first"
            )
        return calibration, "measured on this CPU by bert-plan --measure"
    from pretrain.plan_measure import load_gpu_calibration

    measured = load_gpu_calibration(cluster.name, precision)
    if measured is not None:
        rates = _gpu_cluster_rates(cluster, precision)(
            measured["efficiency"],
            (measured["network_bytes_per_s"], measured["network_latency_s"])
            if "network_bytes_per_s" in measured
            else None,
        )
        return rates, (
            f"efficiency {measured['efficiency']:.2f} of peak, measured on this cluster's GPU "
            "by bert-plan --measure"
        )
    efficiency = fitted_efficiency(cluster.kind)
    rates = _gpu_cluster_rates(cluster, precision)(efficiency, None)
    source = {
        "V100-SXM2": "fitted on NVIDIA's BERT-Large phase 1, 8 x V100 (checked against others)",
        "A100-40GB": "fitted on NVIDIA's BERT-Large phase 1, 8 x A100 (checked against others)",
        "A100-80GB": "fitted on NVIDIA's BERT-Large phase 1, 8 x A100 (checked against others)",
    }.get(cluster.kind, "the A100's, against this GPU's peak: NOT CHECKED against a measurement")
    return rates, f"efficiency {efficiency:.2f} of peak, {source}"


def _gpu_cluster_rates(cluster: Cluster, precision: str) -> Callable[..., Rates]:
    """rates(efficiency, network) of a GPU cluster: the datasheet's peaks, the cluster file's
    links, and a measured network (bytes/s, latency per ring step) where there is one."""
    hw = cluster.hardware

    def rates(efficiency: float, network: tuple[float, float] | None) -> Rates:
        base = gpu_rates(
            cluster.kind, precision, hw.nvlink_gb_per_s, hw.internode_gb_per_s, efficiency
        )
        if network is None:
            return base
        return replace(base, network_bytes_per_s=network[0], network_latency_s=network[1])

    return rates


@dataclass(frozen=True)
class Costed:
    """One layout with its memory, its step time and what follows from them."""

    layout: Layout
    memory: MemoryEstimate
    time: StepTime
    fits: bool
    tokens_per_s: float
    mfu: float


@dataclass
class Plan:
    """Every layout costed on `nodes` nodes; `best` is the chosen one (None: nothing fits)."""

    cluster: Cluster
    shape: ModelShape
    base: Layout
    global_batch: int
    nodes: int
    tokens: float
    steps: int
    efficiency_source: str
    budget_bytes: int
    costed: list[Costed]
    best: Costed | None

    @property
    def world(self) -> int:
        return self.nodes * self.cluster.hardware.gpus_per_node

    def train_seconds(self, item: Costed) -> float:
        return self.steps * item.time.total

    def gpu_hours(self, item: Costed) -> float:
        return self.train_seconds(item) * self.world / 3600


def _order(item: Costed) -> tuple:
    """Fitting first, then the shortest step (within 0.5%), then the simplest layout."""
    simple = (item.layout.tp, RECOMPUTE_COST[item.layout.recompute], item.layout.zero)
    return (not item.fits, round(math.log(item.time.total) / math.log(1.005)), simple)


def plan_nodes(
    shape: ModelShape,
    base: Layout,
    cluster: Cluster,
    rates: Rates,
    nodes: int,
    global_batch: int,
    tokens: float,
    efficiency_source: str,
) -> Plan:
    """Cost every layout on `nodes` nodes and choose the best."""
    gpus = cluster.hardware.gpus_per_node
    world = nodes * gpus
    budget = int((1 - HEADROOM) * cluster.rank_memory_bytes)
    peak = rates.peak_flops
    costed = []
    for layout in candidate_layouts(shape, base, world, gpus, global_batch, MICRO_BATCHES):
        memory = estimate_memory(shape, layout)
        time = step_time(shape, layout, rates, gpus)
        tokens_per_s = global_batch * layout.seq_len / time.total
        mfu = model_flops(shape, layout) / time.total / world / peak
        costed.append(Costed(layout, memory, time, memory.total <= budget, tokens_per_s, mfu))
    costed.sort(key=_order)
    best = costed[0] if costed and costed[0].fits else None
    steps = math.ceil(tokens / (global_batch * base.seq_len))
    return Plan(
        cluster=cluster,
        shape=shape,
        base=base,
        global_batch=global_batch,
        nodes=nodes,
        tokens=tokens,
        steps=steps,
        efficiency_source=efficiency_source,
        budget_bytes=budget,
        costed=costed,
        best=best,
    )


def layout_keys(layout: Layout) -> dict[str, Any]:
    """The config keys that select a layout (what --emit adds to the training command)."""
    return {
        "parallel.tp": layout.tp,
        "parallel.zero": int(layout.zero),
        "train.recompute": layout.recompute,
        "train.micro_batch": layout.micro_batch,
    }


def why_lost(plan: Plan, item: Costed) -> str:
    """One short reason per layout: the chosen one, too big, or slower by which term."""
    if item is plan.best:
        return "BEST: the shortest step that fits"
    if not item.fits:
        return f"does not fit: {item.memory.total / GiB:.1f} GiB > {plan.budget_bytes / GiB:.1f}"
    if plan.best is None:
        return ""
    best = plan.best.time
    slower = item.time.total / best.total - 1
    if slower < 0.005:
        return "as fast; the best uses less tensor parallelism, recompute or ZeRO"
    deltas = {term: getattr(item.time, term) - getattr(best, term) for term in TERMS}
    term = max(deltas, key=lambda name: deltas[name])
    return f"{slower:+.0%} step time, mostly {TERMS[term]} (+{_ms(deltas[term])})"


def _ms(seconds: float) -> str:
    """Milliseconds below 10 s ("0.838 ms", "639 ms", "3,020 ms"), seconds above ("40.7 s")."""
    ms = seconds * 1e3
    if seconds >= 10:
        return f"{seconds:.3g} s"
    return f"{ms:.3g} ms" if ms < 1000 else f"{ms:,.0f} ms"


def _ms_cell(seconds: float) -> str:
    """Six characters of milliseconds without exponents: "  0.26", " 6.427", " 40712"."""
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:6.0f}"
    return f"{ms:6.2f}" if ms >= 1 else f"{ms:6.3f}"


def _hours_cell(hours: float) -> str:
    return f"{hours:8,.0f}" if hours >= 100 else f"{hours:8.3g}"


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 4 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _shown(path: Path) -> str:
    """A cluster file's path relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _header(plan: Plan) -> list[str]:
    shape, base, hw = plan.shape, plan.base, plan.cluster.hardware
    params = parameter_counts(shape, 1)[0]
    device = "CPU ranks" if plan.cluster.kind == "cpu" else hw.gpu
    return [
        f"model: {shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads, "
        f"{params / 1e9:.2f} B parameters, vocab {shape.vocab_size}; seq {base.seq_len}, "
        f"{base.mlm_mode} MLM, {base.precision}, global batch {plan.global_batch}",
        f"cluster {plan.cluster.name} ({_shown(plan.cluster.path)}): {plan.nodes} node(s) x "
        f"{hw.gpus_per_node} {device} = {plan.world} ranks, {plan.budget_bytes / GiB:.1f} GiB "
        f"usable per rank (10% headroom), NVLink {hw.nvlink_gb_per_s:g} GB/s, network "
        f"{hw.internode_gb_per_s:g} GB/s per node",
        f"time model: {plan.efficiency_source}; every time below is a prediction",
        f"budget: {plan.tokens:.3g} tokens = {plan.steps} steps of {plan.global_batch} x "
        f"{base.seq_len} tokens",
    ]


def format_plan(plan: Plan, top: int) -> str:
    """The table a user reads: the best layouts first, memory and time by term, and why."""
    lines = _header(plan)
    lines.append("")
    lines.append(
        "   tp   dp zero recompute   mb   acc | GiB: param  grad optim  copy activ  head alloc"
        "  total | ms: compute     tp     dp    opt   step |   tokens/s   MFU   train    GPU-h"
        " | why"
    )
    shown = plan.costed if top <= 0 else plan.costed[:top]
    for item in shown:
        lay, mem, time = item.layout, item.memory, item.time
        gib = [
            mem.parameters,
            mem.gradients,
            mem.optimizer,
            mem.weight_copies,
            mem.activations + mem.recompute,
            mem.head_grads + mem.head_chunk,
            mem.allowance,
            mem.total,
        ]
        ms = [time.compute, time.tp_comm, time.dp_comm, time.optimizer, time.total]
        mark = "*" if item is plan.best else " "
        train = _duration(plan.train_seconds(item))
        lines.append(
            f"{mark} {lay.tp:3d} {lay.dp:4d} {int(lay.zero):4d} {lay.recompute:>9} "
            f"{lay.micro_batch:4d} {lay.accumulation:5d} |     "
            + " ".join(f"{value / GiB:5.1f}" for value in gib)
            + " |    "
            + " ".join(_ms_cell(value) for value in ms)
            + f" | {item.tokens_per_s:10,.0f} {item.mfu:5.1%} {train:>7} "
            f"{_hours_cell(plan.gpu_hours(item))}"
            f" | {why_lost(plan, item)}"
        )
    hidden = len(plan.costed) - len(shown)
    if hidden:
        lines.append(f"  ... {hidden} more layout(s) (--top 0 shows all)")
    return "\n".join(lines)


def summary_lines(plan: Plan, walltime_s: int | None) -> list[str]:
    """The chosen layout in words, with the run's duration, cost and job count."""
    assert plan.best is not None
    best = plan.best
    keys = " ".join(f"{k}={v}" for k, v in layout_keys(best.layout).items())
    train_s = plan.train_seconds(best)
    lines = [
        f"best: {keys} (dp {best.layout.dp}, {best.layout.accumulation} micro-batch(es) per "
        f"step): {_ms(best.time.total)} per step, {best.tokens_per_s:,.0f} tokens/s, MFU "
        f"{best.mfu:.0%}, {best.memory.total / GiB:.1f} GiB per rank; {_duration(train_s)} for "
        f"{plan.tokens:.3g} tokens on {plan.world} ranks = {plan.gpu_hours(best):.4g} GPU-hours",
    ]
    if walltime_s is not None:
        usable = walltime_s - plan.cluster.stop_margin_s
        jobs = math.ceil(train_s / usable)
        lines.append(
            f"wall time {_duration(walltime_s)} per job (stop margin {plan.cluster.stop_margin_s}"
            f" s): {jobs} job(s), resubmitted after each checkpoint"
        )
    return lines


def plan_json(plan: Plan, walltime_s: int | None) -> dict[str, Any]:
    """Every layout with its memory and time terms, the chosen one marked."""
    layouts = []
    for item in plan.costed:
        layouts.append(
            {
                "layout": layout_keys(item.layout)
                | {"dp": item.layout.dp, "accumulation": item.layout.accumulation},
                "fits": item.fits,
                "best": item is plan.best,
                "memory_bytes": item.memory.as_dict(),
                "step_seconds": item.time.as_dict(),
                "tokens_per_s": item.tokens_per_s,
                "mfu": item.mfu,
                "train_seconds": plan.train_seconds(item),
                "gpu_hours": plan.gpu_hours(item),
                "why": why_lost(plan, item),
            }
        )
    hw = plan.cluster.hardware
    return {
        "cluster": {"name": plan.cluster.name, "path": _shown(plan.cluster.path)}
        | {key: getattr(hw, key) for key in hw.__dataclass_fields__},
        "nodes": plan.nodes,
        "world_size": plan.world,
        "model": {
            "layers": plan.shape.layers,
            "hidden": plan.shape.hidden,
            "heads": plan.shape.heads,
            "vocab_size": plan.shape.vocab_size,
            "seq_len": plan.base.seq_len,
            "mlm_mode": plan.base.mlm_mode,
            "precision": plan.base.precision,
        },
        "global_batch": plan.global_batch,
        "tokens": plan.tokens,
        "steps": plan.steps,
        "walltime_s": walltime_s,
        "time_model": plan.efficiency_source,
        "budget_bytes_per_rank": plan.budget_bytes,
        "layouts": layouts,
    }


def _no_layout_error(plan: Plan) -> ConfigError:
    """Why nothing could be chosen: no layout divides the batch, or none fits."""
    gpus = plan.cluster.hardware.gpus_per_node
    if not plan.costed:
        dps = sorted(
            {
                plan.world // tp
                for tp in range(1, gpus + 1)
                if not (plan.shape.heads % tp or plan.shape.ffn_hidden % tp or gpus % tp)
            }
        )
        step = dps[0]
        nearest = max(step, round(plan.global_batch / step) * step)
        tps = [tp for tp in range(1, gpus + 1) if plan.world % tp == 0 and plan.world // tp in dps]
        nodes = [
            n
            for n in range(1, 4 * plan.nodes + 1)
            if any(plan.global_batch % (n * gpus // tp) == 0 for tp in tps)
        ]
        fewer = [n for n in nodes if n < plan.nodes]
        more = [n for n in nodes if n > plan.nodes]
        others = " or ".join(str(n) for n in (fewer[-1:] + more[:1]))
        return ConfigError(
            f"train.global_batch={plan.global_batch} is not a multiple of micro-batch x dp for "
            f"any layout on {plan.world} ranks (dp = {', '.join(map(str, dps))}): use a "
            f"multiple of {step}, e.g. train.global_batch={nearest}"
            + (f", or --nodes {others}" if others else "")
        )
    smallest = min(plan.costed, key=lambda item: item.memory.total)
    keys = ", ".join(f"{k}={v}" for k, v in layout_keys(smallest.layout).items())
    return ConfigError(
        f"the model fits no layout on {plan.nodes} node(s) of {plan.cluster.name}: the smallest "
        f"needs {smallest.memory.total / GiB:.1f} GiB per rank ({keys}), "
        f"{plan.budget_bytes / GiB:.1f} GiB are usable (90% of the device): use more nodes, "
        "a shorter data.seq_len or a larger GPU"
    )


def check_walltime(plan: Plan, walltime_s: int, checkpoint_every: int) -> None:
    """A job must reach its first checkpoint, or every job is lost work."""
    assert plan.best is not None
    usable = walltime_s - plan.cluster.stop_margin_s
    interval = checkpoint_every * plan.best.time.total
    if usable <= 0 or interval > usable:
        most = max(1, int(max(usable, 0) / plan.best.time.total))
        raise ConfigError(
            f"--walltime {_duration(walltime_s)} leaves {_duration(max(usable, 0))} of training "
            f"per job (stop margin {plan.cluster.stop_margin_s} s), less than one checkpoint "
            f"interval (checkpoint.every={checkpoint_every} steps = {_duration(interval)} "
            f"predicted): set checkpoint.every={most} or less, or ask for a longer wall time"
        )


def _cluster_of_gpu(device_name: str) -> str | None:
    """The first built-in cluster whose GPU is this device's kind."""
    from launch.fit import CLUSTER_DIR

    kind = gpu_kind(device_name)
    for path in sorted(CLUSTER_DIR.glob("*.yaml")):
        hardware = read_cluster_file(path).get("hardware") or {}
        if kind is not None and gpu_kind(str(hardware.get("gpu", ""))) == kind:
            return path.stem
    return None


@dataclass(frozen=True)
class StartupPrediction:
    """The plan for a run's own layout: bert-train prints `line` at start-up and `compare` for
    its first log intervals, so that a cluster that misbehaves shows at once."""

    line: str
    memory_gib: float | None = None
    ms_per_step: float | None = None

    def compare(self, record: dict[str, Any]) -> str | None:
        """Predicted against one interval's measured step time and peak memory (max over
        ranks; on a CPU the resident memory, which adds the process's own baseline)."""
        if self.ms_per_step is None or self.memory_gib is None or "ms_per_step" not in record:
            return None
        measured_ms = record["ms_per_step"]
        text = (
            f"plan vs measured at step {record['step']}: {_ms(self.ms_per_step / 1000)} "
            f"predicted, {_ms(measured_ms / 1000)} measured per step "
            f"({_deviation(measured_ms, self.ms_per_step)})"
        )
        peak_gb = record.get("mem_peak_max_gb")
        if peak_gb is not None:
            measured_gib = peak_gb * 1e9 / GiB
            text += (
                f"; {self.memory_gib:.2f} GiB predicted, {measured_gib:.2f} GiB peak measured "
                f"({_deviation(measured_gib, self.memory_gib)})"
            )
        return text


def _deviation(measured: float, predicted: float) -> str:
    return f"measured {100 * (measured / predicted - 1):+.0f}%" if predicted > 0 else "no ratio"


def startup_prediction(
    config: Any, shape: ModelShape, layout: Layout, device_name: str
) -> StartupPrediction:
    """bert-train's start-up line: the plan's memory and step time for the run's own layout,
    on train.cluster or else on the built-in cluster of the detected GPU."""
    name = config.train.cluster or _cluster_of_gpu(device_name)
    if name is None:
        return StartupPrediction(
            "plan: no prediction (set train.cluster to a cluster bert-plan knows)"
        )
    try:
        cluster = load_cluster(name)
        rates, source = cluster_rates(cluster, layout.precision, shape)
    except (ConfigError, LaunchError) as error:
        return StartupPrediction(f"plan: no prediction ({error})")
    gpus = min(cluster.hardware.gpus_per_node, layout.tp * layout.dp)
    memory = estimate_memory(shape, layout).total / GiB
    seconds = step_time(shape, layout, rates, gpus).total
    line = (
        f"plan: predicted {memory:.2f} GiB per rank and {_ms(seconds)} per step on "
        f"cluster {cluster.name} ({source}); the first log intervals are compared with it"
    )
    return StartupPrediction(line, memory, seconds * 1000)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bert-plan",
        description="Plan a pre-training run on a cluster: the layouts that fit, per-GPU memory "
        "and step time by term, tokens/s, MFU, time to train and GPU-hours.",
        usage="bert-plan --config FILE --cluster NAME|FILE [options] [key=value ...] "
        "[--emit SCHEDULER [-- bert-launch options]]",
        epilog="Times are predictions of a stated model (see docs/benchmarks.md for how far to "
        "trust them). Everything after -- goes to bert-launch with --emit.",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--config", required=True, metavar="FILE", help="model config (YAML)")
    parser.add_argument(
        "--cluster",
        required=True,
        metavar="NAME|FILE",
        help="a built-in cluster (a file under configs/cluster/, e.g. abci2) or a cluster file",
    )
    parser.add_argument("--nodes", type=int, metavar="N", help="nodes (default: the fewest)")
    parser.add_argument(
        "--tokens",
        type=float,
        metavar="N",
        help="tokens to train on, e.g. 30e9 (default: train.steps x global batch x seq_len)",
    )
    parser.add_argument(
        "--walltime", metavar="HH:MM:SS", help="wall time of one job (checked, jobs counted)"
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument(
        "--top", type=int, default=12, metavar="K", help="layouts shown (default 12; 0 = all)"
    )
    parser.add_argument(
        "--emit",
        choices=("slurm", "pbs", "sge", "mpirun"),
        help="print bert-launch's job script for the best layout (the plan goes to stderr)",
    )
    parser.add_argument(
        "--measure",
        action="store_true",
        help="calibrate on this machine (a CPU): micro-benchmarks and a few real steps; "
        "prints measured against predicted and stores the calibration for later plans",
    )
    return parser


def make_plan(args: argparse.Namespace) -> tuple[Plan, Any, int | None]:
    """The plan the arguments ask for, the resolved config and the wall time in seconds."""
    config = load_config(args.config, args.overrides)
    cluster = load_cluster(args.cluster)
    walltime_s = walltime_seconds(args.walltime) if args.walltime else None
    if args.nodes is not None and args.nodes < 1:
        raise ConfigError(f"--nodes {args.nodes} must be at least 1")
    precision = plan_precision(config.train.precision, cluster.kind)
    vocab = config.model.vocab_size or DEFAULT_VOCAB
    shape = resolve_model_shape(config, vocab)
    rates, source = cluster_rates(cluster, precision, shape)
    base = Layout(
        seq_len=config.data.seq_len,
        micro_batch=1,
        precision=precision,
        mlm_mode=config.mlm.mode,
        mask_rate=config.mlm.mask_rate,
        device="cpu" if cluster.kind == "cpu" else "cuda",
    )
    global_batch = config.train.global_batch
    tokens = args.tokens
    if tokens is None:
        tokens = config.train.steps * global_batch * config.data.seq_len
    if not tokens > 0:
        raise ConfigError(f"--tokens {args.tokens} must be positive")

    def at(nodes: int) -> Plan:
        return plan_nodes(shape, base, cluster, rates, nodes, global_batch, tokens, source)

    if args.nodes is not None:
        plan = at(args.nodes)
    else:
        plan = None
        for nodes in NODE_COUNTS:
            candidate = at(nodes)
            if candidate.best is None:
                plan = plan or candidate
                continue
            usable = None if walltime_s is None else walltime_s - cluster.stop_margin_s
            if usable is None or candidate.train_seconds(candidate.best) <= usable:
                plan = candidate
                break
        else:
            if plan is None or plan.best is None:
                raise _no_layout_error(plan or at(NODE_COUNTS[-1]))
            raise ConfigError(
                f"no node count up to {NODE_COUNTS[-1]} trains {tokens:.3g} tokens within "
                f"--walltime {args.walltime}: plan with --nodes N and run several jobs"
            )
    if plan.best is None:
        raise _no_layout_error(plan)
    if walltime_s is not None:
        check_walltime(plan, walltime_s, config.checkpoint.every)
    return plan, config, walltime_s


def emit_script(args: argparse.Namespace, plan: Plan, launch_options: list[str]) -> int:
    """The job script of the best layout, written by bert-launch's own generator to stdout."""
    from launch import cli as launch_cli

    assert plan.best is not None
    keys = layout_keys(plan.best.layout)
    ours = keys | {"train.steps": 0, "train.cluster": 0}
    user = [o for o in args.overrides if o.split("=", 1)[0] not in ours]
    command = ["bert-train", "--config", args.config, *user]
    command += [f"{key}={value}" for key, value in keys.items()]
    command += [f"train.steps={plan.steps}", f"train.cluster={args.cluster}"]
    options = [args.emit, "--cluster", args.cluster, "--nodes", str(plan.nodes), "--dry-run"]
    if args.walltime:
        options += ["--walltime", args.walltime]
    return launch_cli.main([*options, *launch_options, "--", *command])


def measure(args: argparse.Namespace) -> int:
    """--measure: calibrate the time model on a node of the cluster (its GPU, or this CPU)."""
    from pretrain.plan_measure import measure_and_report, measure_gpu_and_report

    config = load_config(args.config, args.overrides)
    cluster = load_cluster(args.cluster)
    precision = plan_precision(config.train.precision, cluster.kind)
    if cluster.kind == "cpu":
        return measure_and_report(config, cluster.name, precision, cluster.hardware.gpus_per_node)
    rates = _gpu_cluster_rates(cluster, precision)
    return measure_gpu_and_report(config, cluster.name, cluster.kind, precision, rates)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    own, launch_options = argv[:split], argv[split + 1 :]
    args = build_parser().parse_args(own)
    if launch_options and not args.emit:
        print("bert-plan: error: options after -- are for bert-launch: use --emit", file=sys.stderr)
        return 2
    try:
        if args.measure:
            return measure(args)
        plan, _, walltime_s = make_plan(args)
        if args.json:
            print(json.dumps(plan_json(plan, walltime_s), indent=1))
        else:
            out = sys.stderr if args.emit else sys.stdout
            print(format_plan(plan, args.top), file=out)
            print("\n".join(summary_lines(plan, walltime_s)), file=out)
        if args.emit:
            sys.stdout.flush()
            return emit_script(args, plan, launch_options)
        return 0
    except (ConfigError, LaunchError) as error:
        print(f"bert-plan: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
