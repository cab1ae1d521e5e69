"""`bert-plan --measure`: calibrate the step-time model on the machine at hand.

On a GPU node (a cluster file with a GPU): real steps of the config on this rank's GPU give the
one efficiency constant at which the model reproduces them (instead of the published fit), and
under a launcher on several nodes an NCCL all-reduce gives the network's figures.

On a CPU node, short micro-benchmarks, each stored in the calibration:

- matrix products at the config's own shapes (QKV, attention-out, MLP in and out at the
  config's micro-batch), in the run's dtype: their FLOP rate over the CPU's measured peak
  (pretrain/devices.py) is the efficiency;
- a memory-bound pass (a 128 MB copy): the memory bandwidth of elementwise work and the
  optimizer;
- a gloo all-reduce between two processes of this machine: 16 MB for the link bandwidth, and
  4 bytes where tensor parallelism communicates inside both processes' real steps of the config
  for the latency per ring step (what a call costs in training, ranks arriving apart); and,
  when bert-plan --measure is started by a launcher on several nodes (mpirun, srun, torchrun),
  one over all its ranks first: the network bandwidth and latency across nodes;
- a few real training steps (the trainer's model, loss, clipping and LAMB on random tokens, one
  process) at four points: the config's micro-batch and a quarter of it, at the config's depth
  and at half of it. What the micro-benchmarks do not explain is split, by non-negative least
  squares over the four points, into elementwise work at a fitted rate per byte (kernels that
  compute rather than stream) and a dispatch cost per layer and per micro-batch (Python and
  operator dispatch, whatever a tensor's size). A cost per
  byte alone over-predicted a larger model (base from tiny: +51%) and under-predicted tp 2,
  whose ranks dispatch as many operators on halved tensors (-29%).

Measured at one thread per rank and at all cores (what one process uses), and at one thread
with the node's other cores each training the same step in a neighbour process (a rank among
busy ranks: they share the memory bandwidth and caches); the plan takes the calibration for the
number of threads each of its ranks gets (torchrun gives each of several ranks one thread) and,
with several ranks per node, the one measured among busy ranks. Stored in
`$XDG_CACHE_HOME/bert-pretrain/plan_calibration.json` by cluster name, CPU model, threads, busy
ranks, dtype and torch version; later plans for that cluster use it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launch.env import LaunchEnv, detect_environment
from launch.rendezvous import init_distributed
from pretrain.config import Config, ConfigError, MLMConfig, ModelShape, resolve_model_shape
from pretrain.cpu_memory import keep_freed_memory
from pretrain.devices import _cpu_model_name, cache_path, cpu_peak_flops
from pretrain.masking import IGNORE
from pretrain.memory import DEFAULT_VOCAB, Layout
from pretrain.plan_model import Rates, elementwise_bytes, optimizer_seconds, step_time
from pretrain.precision import unscale_and_find_nonfinite

ALLREDUCE_BYTES = 16 * 1024**2
LAUNCHED_TIMEOUT_S = 300.0  # rendezvous and collectives of the all-reduce under a launcher
STEPS = 4  # real steps timed after one warm-up step
STEP = "one training step (s), model before the fit"


@dataclass(frozen=True)
class Calibration:
    """What --measure found, per thread count and dtype."""

    threads: int
    peak_flops: float
    efficiency: float
    memory_bytes_per_s: float
    link_bytes_per_s: float
    link_latency_s: float
    elementwise_bytes_per_s: float
    """Fitted on the real steps: the rate at which the model's elementwise bytes go by."""
    dispatch_s_per_layer: float = 0.0
    dispatch_s_per_micro_batch: float = 0.0
    """Fitted on the real steps: operator dispatch per layer and per micro-batch."""
    optimizer_bytes_per_s: float | None = None
    """Timed: clipping and a LAMB step over 8 M parameters, per byte of its state traffic."""
    network_bytes_per_s: float | None = None
    network_latency_s: float | None = None
    """Measured across nodes when --measure ran under a launcher on several nodes; None = the
    link's figures (one node)."""


def calibration_path() -> Path:
    return cache_path().with_name("plan_calibration.json")


def _key(cluster: str, precision: str, threads: int, ranks: int = 1) -> str:
    """A calibration's name; `ranks` > 1: measured with that many ranks busy on the node."""
    cpu = _cpu_model_name() or "cpu"
    busy = f"|ranks={ranks}" if ranks > 1 else ""
    return f"{cluster}|{cpu}|threads={threads}{busy}|{precision}|torch={torch.__version__}"


def busy_ranks(threads: int) -> int:
    """Ranks of `threads` threads that fill this node's cores (at least 1)."""
    return max(1, (os.cpu_count() or 1) // threads)


def threads_per_rank(ranks_per_node: int) -> int:
    """Threads one rank computes with: OMP_NUM_THREADS when set, else all cores for a single
    rank and one each for several (torchrun's default)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return (os.cpu_count() or 1) if ranks_per_node == 1 else 1


def load_calibration(
    cluster: str, precision: str, ranks_per_node: int, shape: ModelShape
) -> Rates | None:
    """The time model's rates from a stored calibration, or None when there is none: the one
    measured with as many ranks busy on the node as the plan puts there (at most as many as
    fill its cores; one stored before such calibrations existed stands in for it)."""
    try:
        stored = json.loads(calibration_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    threads = threads_per_rank(ranks_per_node)
    ranks = min(ranks_per_node, busy_ranks(threads))
    entry = stored.get(_key(cluster, precision, threads, ranks))
    if not isinstance(entry, dict):
        entry = stored.get(_key(cluster, precision, threads))
    if not isinstance(entry, dict):
        return None
    return rates_from(Calibration(**entry), shape)


def rates_from(calibration: Calibration, shape: ModelShape) -> Rates:
    return Rates(
        peak_flops=calibration.peak_flops,
        efficiency=calibration.efficiency,
        memory_bytes_per_s=calibration.memory_bytes_per_s,
        link_bytes_per_s=calibration.link_bytes_per_s,
        network_bytes_per_s=calibration.network_bytes_per_s or calibration.link_bytes_per_s,
        link_latency_s=calibration.link_latency_s,
        network_latency_s=calibration.network_latency_s or calibration.link_latency_s,
        elementwise_bytes_per_s=calibration.elementwise_bytes_per_s,
        optimizer_bytes_per_s=calibration.optimizer_bytes_per_s,
        dispatch_s_per_layer=calibration.dispatch_s_per_layer,
        dispatch_s_per_micro_batch=calibration.dispatch_s_per_micro_batch,
    )


def _store(key: str, calibration: Calibration) -> None:
    _store_entry(key, asdict(calibration))


def _store_entry(key: str, entry: dict[str, Any]) -> None:
    path = calibration_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    data[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    temp.replace(path)


def _best_seconds(run: Callable[[], object], repeats: int = 5) -> float:
    run()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return min(times)


def measure_gemms(shape: ModelShape, layout: Layout) -> float:
    """FLOP/s of the config's four linear products at its micro-batch, in the run's dtype."""
    dtype = torch.float32 if layout.precision == "fp32" else torch.bfloat16
    h, f, tokens = shape.hidden, shape.ffn_hidden, layout.micro_batch * layout.seq_len
    generator = torch.Generator().manual_seed(0)
    flops = seconds = 0.0
    for m, k, n in ((tokens, h, 3 * h), (tokens, h, h), (tokens, h, f), (tokens, f, h)):
        a = torch.randn(m, k, generator=generator).to(dtype)
        b = torch.randn(k, n, generator=generator).to(dtype)
        seconds += _best_seconds(lambda a=a, b=b: torch.mm(a, b))
        flops += 2.0 * m * k * n
    return flops / seconds


def measure_memory_bandwidth() -> float:
    """Bytes/s of a 128 MB copy (read + write)."""
    source = torch.ones(32 * 1024**2)
    target = torch.empty_like(source)
    return 2 * source.nbytes / _best_seconds(lambda: target.copy_(source))


OPTIMIZER_ELEMENTS = 8 * 1024**2


def measure_optimizer() -> float:
    """Bytes/s of the optimizer's pass as the time model counts it (13 fp32 accesses per
    parameter: the finiteness check's and clipping's reads, LAMB's reads and writes), timed on
    8 M parameters in 32 tensors with gradients as bert-train's step ends: the loss scaler's
    check, clip_grad_norm_, then a LAMB step."""
    from pretrain.optim import clip_grad_norm_, optimizer_for_groups

    generator = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(OPTIMIZER_ELEMENTS // 32, generator=generator))
        for _ in range(32)
    ]
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator) * 1e-3
    optimizer = optimizer_for_groups(
        [{"params": params, "weight_decay": 0.01}], "lamb", 1e-3, (0.9, 0.999), 1e-6, None
    )

    def step() -> None:
        unscale_and_find_nonfinite([p.grad for p in params], 1.0)
        clip_grad_norm_(params, 1.0)
        optimizer.step()

    return 4 * 13 * OPTIMIZER_ELEMENTS / _best_seconds(step)


def _timed_allreduce(device: torch.device | None = None) -> tuple[float, float]:
    """Median seconds of a 16 MB and of a 4-byte all-reduce over the default group, each right
    after a barrier."""
    import torch.distributed as dist

    device = device or torch.device("cpu")
    results = []
    for tensor in (torch.ones(ALLREDUCE_BYTES // 4, device=device), torch.ones(1, device=device)):
        times = []
        for _ in range(8):
            dist.barrier()
            _synchronize(device)
            begin = time.perf_counter()
            dist.all_reduce(tensor)
            _synchronize(device)
            times.append(time.perf_counter() - begin)
        results.append(statistics.median(times[2:]))
    return results[0], results[1]


def _collective_in_a_step(shape: ModelShape, layout: Layout, mlm: MLMConfig) -> float:
    """Seconds one small all-reduce adds to a CPU training step: every rank of the default
    group trains the config's step (one process each), with a 4-byte all-reduce where tensor
    parallelism puts its collectives (after each layer's attention and MLP, in forward and in
    backward), against the same steps without them.

    It pays for ranks that arrive apart (what each does between two collectives varies) and
    for waking a rank that slept in the wait: about 1 ms a call on a 2-vCPU VM, where the same
    call between uniform bursts of matrix products cost 0.1-0.6 ms and a tiny tp 2 step spent
    2-2.6 ms a call. (A GPU's NCCL call is queued behind the step's kernels: there the bare
    timing stands.)"""
    import torch.distributed as dist

    flag = torch.ones(1)
    synced = [False]
    calls = [0]

    def at_block_edge() -> None:
        if synced[0]:
            dist.all_reduce(flag)
            calls[0] += 1

    step = _step_runner(shape, layout, mlm, torch.device("cpu"), at_block_edge)
    step()
    medians: dict[bool, list[float]] = {False: [], True: []}
    for with_calls in (False, True, False, True):
        synced[0] = with_calls
        calls[0] = 0
        dist.barrier()
        times = []
        for _ in range(STEPS + 1):
            begin = time.perf_counter()
            step()
            times.append(time.perf_counter() - begin)
        medians[with_calls].append(statistics.median(times[1:]))
    per_step = calls[0] / (STEPS + 1)  # the last synced round's calls
    added = statistics.median(medians[True]) - statistics.median(medians[False])
    return max(added / per_step, 0.0)


def _ring_figures(
    large: float, small: float, members: int, per_call: float | None = None
) -> tuple[float, float]:
    """(bus bytes/s, latency per ring step) of a ring all-reduce from its two timings; the
    latency from `per_call` (a small call's cost inside a step) where it was measured."""
    latency = (small if per_call is None else per_call) / (2 * (members - 1))
    bus = 2 * (members - 1) / members * ALLREDUCE_BYTES / max(large - small, 1e-9)
    return bus, latency


def _allreduce_worker(
    rank: int, port: int, queue: Any, step: tuple[ModelShape, Layout, MLMConfig]
) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    keep_freed_memory()  # as bert-train runs on a CPU
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        timings = (*_timed_allreduce(), _collective_in_a_step(*step))
        if rank == 0:
            queue.put(timings)
    finally:
        dist.destroy_process_group()


def measure_allreduce(shape: ModelShape, layout: Layout, mlm: MLMConfig) -> tuple[float, float]:
    """(bus bytes/s, latency per ring step) of a gloo all-reduce between two processes; the
    latency as a small call costs inside their training steps of the config."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(
        _allreduce_worker, args=(port, queue, (shape, layout, mlm)), nprocs=2, start_method="spawn"
    )
    large, small, per_call = queue.get()
    return _ring_figures(large, small, 2, per_call)


@dataclass(frozen=True)
class LaunchedAllReduce:
    """A gloo all-reduce over every rank a launcher started (mpirun, srun, torchrun)."""

    bus_bytes_per_s: float
    latency_s: float
    ranks: int
    nodes: int


def measure_launched_allreduce(
    env: LaunchEnv,
    device: torch.device | None = None,
    step: tuple[ModelShape, Layout, MLMConfig] | None = None,
) -> LaunchedAllReduce | None:
    """Under a launcher with several ranks: the all-reduce over all of them (every rank takes
    part; the group is left again afterwards; NCCL on GPUs, gloo on CPUs). None for one
    process. The nodes are the ranks
    over the launcher's ranks per node; a ring over the ranks in order crosses each node
    boundary once, so across nodes its bus rate stands for one node's network rate. On CPUs,
    the latency is a small call's cost inside training steps of `step` (the config's shape,
    one-process layout and MLM settings)."""
    import torch.distributed as dist

    if env.world_size == 1:
        return None
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    init_distributed(env, backend, LAUNCHED_TIMEOUT_S)
    try:
        large, small = _timed_allreduce(device)
        on_cpu = device is None or device.type == "cpu"
        per_call = _collective_in_a_step(*step) if on_cpu and step is not None else None
    finally:
        dist.destroy_process_group()
    bus, latency = _ring_figures(large, small, env.world_size, per_call)
    nodes = max(1, env.world_size // max(1, env.local_world_size))
    return LaunchedAllReduce(bus, latency, env.world_size, nodes)


def _step_runner(
    shape: ModelShape,
    layout: Layout,
    mlm: MLMConfig,
    device: torch.device,
    at_block_edge: Callable[[], None] | None = None,
) -> Callable[[], None]:
    """One real training step of `shape` at `layout` on random tokens, as a function: forward
    and backward under the run's autocast, bert-train's finiteness check, clipping and LAMB.
    `at_block_edge` runs where tensor parallelism communicates: after each layer's attention
    and MLP in forward, and before their backward."""
    from pretrain.model import apply_recompute, build_model
    from pretrain.objectives import pretraining_loss
    from pretrain.optim import build_param_groups, clip_grad_norm_, optimizer_for_groups
    from pretrain.precision import autocast_context

    torch.manual_seed(0)
    ids = torch.randint(5, shape.vocab_size, (layout.micro_batch, layout.seq_len))
    picked = torch.rand(ids.shape) < layout.mask_rate
    # As the data pipeline labels them: sparse MLM only the picked positions, dense every one.
    labels = ids.clone() if mlm.mode == "dense" else torch.where(picked, ids, IGNORE)
    batch = {
        "input_ids": ids,
        "token_type_ids": torch.zeros_like(ids),
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "picked": picked,
    }
    batch = {key: value.to(device) for key, value in batch.items()}
    model = build_model(shape).to(device)
    apply_recompute(model, layout.recompute)
    model.train()
    if at_block_edge is not None:
        for layer in model.layers:
            for block in (layer.attention, layer.mlp):
                block.register_forward_hook(lambda *_: at_block_edge())
                block.register_full_backward_pre_hook(lambda *_: at_block_edge())
    optimizer = optimizer_for_groups(
        build_param_groups(model, 0.01), "lamb", 1e-3, (0.9, 0.999), 1e-6, None
    )
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with autocast_context(layout.precision, device.type):
            loss = pretraining_loss(model, batch, mlm).loss
        loss.backward()
        unscale_and_find_nonfinite([p.grad for p in params], 1.0)  # bert-train's check
        clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_steps(
    shape: ModelShape, layout: Layout, mlm: MLMConfig, device: torch.device | None = None
) -> float:
    """Median seconds of a real training step (one process, random tokens, no data loader) on
    `device` (default the CPU; a GPU is synchronised before each clock reading)."""
    device = device or torch.device("cpu")
    step = _step_runner(shape, layout, mlm, device)
    times = []
    for _ in range(STEPS + 1):
        _synchronize(device)
        begin = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - begin)
    return statistics.median(times[1:])


def _neighbour(
    shape: ModelShape, layout: Layout, mlm: MLMConfig, threads: int, ready: Any, stop: Any
) -> None:
    """A rank's neighbour on the node: trains the same step over and over until `stop`."""
    torch.set_num_threads(threads)
    keep_freed_memory()
    step = _step_runner(shape, layout, mlm, torch.device("cpu"))
    step()
    ready.set()
    while not stop.is_set():
        step()


@contextlib.contextmanager
def _busy_neighbours(
    count: int, shape: ModelShape, layout: Layout, mlm: MLMConfig, threads: int
) -> Iterator[None]:
    """`count` processes training the config's step beside this one while the block runs, as
    the other ranks of a node do: they share its memory bandwidth and caches."""
    if count == 0:
        yield
        return
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    ready = [context.Event() for _ in range(count)]
    stop = context.Event()
    workers = [
        context.Process(target=_neighbour, args=(shape, layout, mlm, threads, r, stop))
        for r in ready
    ]
    for worker in workers:
        worker.start()
    try:
        for event, worker in zip(ready, workers, strict=True):
            while not event.wait(1.0):
                if not worker.is_alive():
                    raise ConfigError(
                        f"a neighbour process of --measure died before its first step (exit "
                        f"code {worker.exitcode}); out of memory for {count + 1} copies of the "
                        "model? Plan fewer ranks per node"
                    )
        yield
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=120)
            if worker.is_alive():
                worker.kill()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_NO_FIT = {
    "elementwise_bytes_per_s": math.inf,
    "dispatch_s_per_layer": 0.0,
    "dispatch_s_per_micro_batch": 0.0,
}


def fit_elementwise(
    calibration: Calibration, points: list[tuple[ModelShape, Layout]], seconds: list[float]
) -> dict[str, float]:
    """What the micro-benchmarks do not explain of the measured steps, as a rate per byte of
    elementwise work (the optimizer's included) and a dispatch cost per layer and per
    micro-batch: least squares of  rest = bytes / rate + layers x per_layer + per_micro_batch.
    No term may be negative (a busy machine's noise can ask for one): the best fit over the
    subsets of the dispatch terms whose terms are all non-negative is taken."""
    rows, rests = [], []
    for (shape, layout), measured in zip(points, seconds, strict=True):
        # Matrix products and a timed optimizer are known; the rest is fitted (an untimed
        # optimizer goes at the fitted elementwise rate).
        nothing = rates_from(replace(calibration, **_NO_FIT), shape)
        moved = elementwise_bytes(shape, layout)
        if calibration.optimizer_bytes_per_s is None:
            unit = replace(calibration, elementwise_bytes_per_s=1.0, **_zero_dispatch())
            moved += optimizer_seconds(shape, layout, rates_from(unit, shape))
        rests.append(measured - step_time(shape, layout, nothing, 1).total)
        rows.append([moved, shape.layers, 1.0])
    a, b = np.array(rows), np.array(rests)
    best: tuple[float, np.ndarray] | None = None
    for columns in ([0, 1, 2], [0, 1], [0, 2], [0]):
        solution = np.linalg.lstsq(a[:, columns], b, rcond=None)[0]
        if solution[0] <= 0 or (solution < 0).any():
            continue
        full = np.zeros(3)
        full[columns] = solution
        residual = float(np.sum((a @ full - b) ** 2))
        if best is None or residual < best[0] * (1 - 1e-9):
            best = (residual, full)
    if best is None:  # the steps ran faster than their matrix products: nothing to fit
        return {"elementwise_bytes_per_s": calibration.memory_bytes_per_s, **_zero_dispatch()}
    per_byte, per_layer, per_micro_batch = best[1]
    return {
        "elementwise_bytes_per_s": float(1.0 / per_byte),
        "dispatch_s_per_layer": float(per_layer),
        "dispatch_s_per_micro_batch": float(per_micro_batch),
    }


def _zero_dispatch() -> dict[str, float]:
    return {"dispatch_s_per_layer": 0.0, "dispatch_s_per_micro_batch": 0.0}


def calibrate(
    shape: ModelShape,
    layout: Layout,
    mlm: MLMConfig,
    threads: int,
    link: tuple[float, float],
    neighbours: int = 0,
) -> tuple[Calibration, dict[str, tuple[float, float]]]:
    """Measure at `threads` threads, with `neighbours` processes training the same step beside
    this one (a node whose every core has a rank); (the calibration, measured vs predicted per
    term)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    keep_freed_memory()  # as bert-train runs on a CPU
    try:
        with _busy_neighbours(neighbours, shape, layout, mlm, threads):
            calibration, points, seconds = _measure_all(shape, layout, mlm, threads, link)
    finally:
        torch.set_num_threads(previous)
    measured = seconds[0]
    bandwidth = calibration.memory_bytes_per_s
    fit = fit_elementwise(calibration, points, seconds)
    calibration = replace(calibration, **fit)
    before = replace(calibration, elementwise_bytes_per_s=bandwidth, **_zero_dispatch())
    without = step_time(shape, layout, rates_from(before, shape), 1).total
    report = {
        "matrix products (FLOP/s)": (
            calibration.efficiency * calibration.peak_flops,
            calibration.peak_flops,
        ),
        "memory copy (bytes/s)": (bandwidth, bandwidth),
        "clipping + LAMB (bytes/s of state traffic)": (
            calibration.optimizer_bytes_per_s,
            bandwidth,
        ),
        STEP: (measured, without),
    }
    return calibration, report


def _measure_all(
    shape: ModelShape, layout: Layout, mlm: MLMConfig, threads: int, link: tuple[float, float]
) -> tuple[Calibration, list[tuple[ModelShape, Layout]], list[float]]:
    """The micro-benchmarks and the four real steps (before the fit)."""
    dtype = "fp32" if layout.precision == "fp32" else "bf16"
    peak = cpu_peak_flops(dtype)
    gemm_rate = measure_gemms(shape, layout)
    bandwidth = measure_memory_bandwidth()
    optimizer_rate = measure_optimizer()
    # A busy machine can measure the square-GEMM peak below what the model's shapes then
    # reach: the peak is then at least the rate just measured.
    peak = max(peak, gemm_rate)
    calibration = Calibration(
        threads=threads,
        peak_flops=peak,
        efficiency=gemm_rate / peak,
        memory_bytes_per_s=bandwidth,
        link_bytes_per_s=link[0],
        link_latency_s=link[1],
        elementwise_bytes_per_s=bandwidth,
        optimizer_bytes_per_s=optimizer_rate,
    )
    # Four real steps: the config's micro-batch and a quarter of it, at the config's depth
    # and at half of it; they separate the cost per byte from the cost per operator.
    small = replace(layout, micro_batch=max(1, layout.micro_batch // 4))
    other = replace(shape, layers=max(1, shape.layers // 2))
    if other.layers == shape.layers:  # one layer: a deeper model instead
        other = replace(shape, layers=2)
    points = [(shape, layout), (shape, small), (other, small), (other, layout)]
    seconds = [measure_steps(s, lay, mlm) for s, lay in points]
    return calibration, points, seconds


def _measured_layout(config: Config, precision: str, device: str) -> tuple[ModelShape, Layout]:
    """The config's shape and its one-process layout, as --measure times it."""
    shape = resolve_model_shape(config, config.model.vocab_size or DEFAULT_VOCAB)
    layout = Layout(
        seq_len=config.data.seq_len,
        micro_batch=config.train.micro_batch,
        recompute=config.train.recompute,
        precision=precision,
        mlm_mode=config.mlm.mode,
        mask_rate=config.mlm.mask_rate,
        device=device,
    )
    return shape, layout


def measure_and_report(
    config: Config, cluster: str, precision: str, ranks_per_node: int | None = None
) -> int:
    """bert-plan --measure: calibrate at one thread and at all cores, and one-thread ranks among
    the cluster's `ranks_per_node` (at most one per core; default one per core); print measured
    against the model, store the calibration under `cluster`."""
    shape, layout = _measured_layout(config, precision, "cpu")
    env = detect_environment()
    launched = measure_launched_allreduce(env, step=(shape, layout, config.mlm))
    if launched is not None and env.rank != 0:
        return 0  # the all-reduce needed every rank; rank 0 calibrates its node and stores
    network = None
    if launched is not None:
        where = f"across {launched.nodes} nodes" if launched.nodes > 1 else "on one node"
        print(
            f"gloo all-reduce {where}, {launched.ranks} ranks: "
            f"{launched.bus_bytes_per_s / 1e9:.2f} GB/s bus, {launched.latency_s * 1e6:.0f} us"
        )
        if launched.nodes > 1:
            network = {
                "network_bytes_per_s": launched.bus_bytes_per_s,
                "network_latency_s": launched.latency_s,
            }
    link = measure_allreduce(shape, layout, config.mlm)
    print(f"gloo all-reduce, 2 processes: {link[0] / 1e9:.2f} GB/s bus, {link[1] * 1e6:.0f} us")
    # One rank alone at one thread and at all cores; and, where one-thread ranks can fill the
    # node, one rank among them (bert-train's ranks on a CPU node share its memory bandwidth
    # and caches, and a tp or dp step waits for the slowest of them).
    cases = [(threads, 1) for threads in sorted({1, os.cpu_count() or 1})]
    busy = min(ranks_per_node or busy_ranks(1), busy_ranks(1))
    if busy > 1:
        cases.append((1, busy))
    for threads, ranks in cases:
        calibration, report = calibrate(shape, layout, config.mlm, threads, link, ranks - 1)
        if network is not None:
            calibration = replace(calibration, **network)
        _store(_key(cluster, precision, threads, ranks), calibration)
        beside = f", beside {ranks - 1} rank(s) training the same step" if ranks > 1 else ""
        print(f"threads {threads}{beside} ({precision}):")
        for name, (measured, predicted) in report.items():
            print(f"  {name:<48} measured {measured:10.4g}  model/peak {predicted:10.4g}")
        predicted = step_time(shape, layout, rates_from(calibration, shape), 1).total
        print(
            f"  fitted: elementwise work {calibration.elementwise_bytes_per_s / 1e9:.3g} GB/s, "
            f"dispatch {calibration.dispatch_s_per_layer * 1e3:.3g} ms per layer + "
            f"{calibration.dispatch_s_per_micro_batch * 1e3:.3g} ms per micro-batch"
        )
        print(f"  calibrated step: predicted {predicted:.4g} s, measured {report[STEP][0]:.4g} s")
    print(f"bert-plan: calibration stored in {calibration_path()}")
    return 0


# --- GPU nodes -------------------------------------------------------------------------------


def fit_efficiency(measured: float, predicted_at: Callable[[float], float]) -> float:
    """The efficiency at which the time model predicts the `measured` step (bisection: the
    predicted step shrinks as the efficiency grows); the one constant a GPU kind gets, as the
    published fit (pretrain/plan_published.py) gets it from a published throughput."""
    low, high = 1e-4, 1.0
    if predicted_at(high) > measured:  # slower than the model even at the datasheet peak
        return high
    for _ in range(60):
        middle = (low + high) / 2
        if predicted_at(middle) > measured:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def _gpu_key(cluster: str, precision: str) -> str:
    return f"{cluster}|gpu|{precision}|torch={torch.__version__}"


def load_gpu_calibration(cluster: str, precision: str) -> dict[str, float] | None:
    """What --measure stored for a GPU cluster: efficiency, and the network when measured."""
    try:
        stored = json.loads(calibration_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entry = stored.get(_gpu_key(cluster, precision))
    return entry if isinstance(entry, dict) else None


def measure_gpu_and_report(
    config: Config, cluster: str, kind: str, precision: str, rates_at: Callable[..., Rates]
) -> int:
    """bert-plan --measure on a GPU node of `cluster`: real steps of the config on this rank's
    GPU give the efficiency at which the time model reproduces them (stored for the cluster and
    used instead of the published fit), and under a launcher on several nodes an NCCL
    all-reduce over every rank gives the network's bandwidth and latency. `rates_at(efficiency,
    network)` builds the cluster's rates."""
    from pretrain.devices import gpu_kind

    env = detect_environment()
    if not torch.cuda.is_available():
        raise ConfigError(
            f"--measure for cluster {cluster} runs on one of its {kind} GPUs: start it on a "
            "node of that cluster (no GPU is visible here)"
        )
    device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    here = torch.cuda.get_device_name(device)
    if gpu_kind(here) != kind:
        raise ConfigError(f"this node's GPU is {here}, but cluster {cluster} has {kind} GPUs")
    launched = measure_launched_allreduce(env, device)
    if launched is not None and env.rank != 0:
        return 0
    network = None
    if launched is not None and launched.nodes > 1:
        network = (launched.bus_bytes_per_s, launched.latency_s)
        print(
            f"NCCL all-reduce across {launched.nodes} nodes, {launched.ranks} ranks: "
            f"{launched.bus_bytes_per_s / 1e9:.1f} GB/s bus, {launched.latency_s * 1e6:.0f} us"
        )
    shape, layout = _measured_layout(config, precision, "cuda")
    try:
        measured = measure_steps(shape, layout, config.mlm, device)
    except torch.cuda.OutOfMemoryError:
        raise ConfigError(
            f"one step of this config at train.micro_batch={layout.micro_batch} does not fit one "
            f"{kind} (--measure runs tp 1): measure a smaller config or micro-batch; the "
            "efficiency it finds is the GPU kind's, for every config"
        ) from None
    efficiency = fit_efficiency(
        measured, lambda e: step_time(shape, layout, rates_at(e, network), 1).total
    )
    entry: dict[str, float] = {"efficiency": efficiency, "measured_step_s": measured}
    if network is not None:
        entry |= {"network_bytes_per_s": network[0], "network_latency_s": network[1]}
    _store_entry(_gpu_key(cluster, precision), entry)
    print(
        f"one training step on {here} ({precision}, micro-batch {layout.micro_batch}, seq "
        f"{layout.seq_len}): {measured * 1e3:.1f} ms; the model reproduces it at efficiency "
        f"{efficiency:.3f} of peak"
    )
    print(f"bert-plan: calibration stored in {calibration_path()}")
    return 0
