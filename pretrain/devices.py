"""Peak matrix-product rates of the devices we run on: the denominator of MFU.

One table, read by the trainer (MFU in the log line), the planner and the benchmarks. GPU
figures are NVIDIA's datasheet peaks for dense matrix products (no 2:4 sparsity), in TFLOP/s
per GPU, by the dtype the matrix products run in:

- fp32: plain fp32 on CUDA cores;
- tf32: fp32 tensors through TF32 tensor cores (`torch.backends.cuda.matmul.allow_tf32`);
- fp16 / bf16: half-precision tensor cores (what autocast uses).

The CPU has no datasheet figure we can trust (it depends on the core count, the vector units
and the BLAS torch was built with), so its "peak" is measured at start-up: a square matrix
product in the run's dtype, timed for well under two seconds, and cached per machine, thread
count, dtype and torch version in `$XDG_CACHE_HOME/bert-pretrain/device_peaks.json` (default
`~/.cache`). The cache keeps the highest rate measured so far: a machine busy with other work
makes one measurement low, never the peak. It is what one process reaches on a large GEMM, so a
CPU MFU near 1 means the run is as fast as matrix products allow here.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

# TFLOP/s, dense. Keys are the GPU kinds `gpu_kind` returns.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # NVIDIA Tesla V100 datasheet (SXM2): single precision 15.7, tensor performance 125
    # (fp16 inputs, fp32 accumulate). Volta has no TF32 and no bf16 tensor cores: tf32 runs as
    # fp32, and bf16 matrix products are emulated on CUDA cores, so the fp32 rate is their
    # ceiling (real emulated bf16 GEMMs are slower still; train in fp16 on V100).
    "V100-SXM2": {"fp32": 15.7, "tf32": 15.7, "fp16": 125.0, "bf16": 15.7},
    # NVIDIA A100 Tensor Core GPU datasheet (40 GB and 80 GB SXM4 alike): FP32 19.5,
    # TF32 156, BF16 312, FP16 312 (the datasheet's 312/624 and 156/312 pairs are
    # dense/sparse; we take the dense figure).
    "A100-40GB": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},
    "A100-80GB": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: FP32 67, TF32 989, BF16 1,979,
    # FP16 1,979 TFLOPS "with sparsity"; dense is half (494.7 / 989.4).
    "H100-SXM": {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: the same Hopper compute as H100 SXM
    # (FP32 67, TF32 989, BF16/FP16 1,979 with sparsity), with 141 GB of HBM3e.
    "H200": {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},
}

# Memory (HBM) bandwidth, GB/s, from the same datasheets: what a memory-bound pass (elementwise
# work, the optimizer step) runs at. V100 SXM2 900; A100 40 GB 1,555 and 80 GB 2,039;
# H100 SXM 3,350; H200 4,800.
MEMORY_GB_PER_S: dict[str, float] = {
    "V100-SXM2": 900.0,
    "A100-40GB": 1555.0,
    "A100-80GB": 2039.0,
    "H100-SXM": 3350.0,
    "H200": 4800.0,
}

_CPU_DTYPES = {
    "fp32": torch.float32,
    "tf32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
_CPU_BUDGET_S = 0.3  # timed repetitions stop after this long (or 20 of them); sizing adds less


def gpu_kind(device_name: str) -> str | None:
    """The PEAK_TFLOPS key for a CUDA device name (`torch.cuda.get_device_name`), or None."""
    name = device_name.upper()
    if "H200" in name:
        return "H200"
    if "H100" in name and ("SXM" in name or "HBM3" in name):  # "NVIDIA H100 80GB HBM3"
        return "H100-SXM"
    if "A100" in name:
        return "A100-80GB" if "80GB" in name else "A100-40GB"
    if "V100" in name and "SXM2" in name:
        return "V100-SXM2"
    return None


def matmul_dtype(precision: str, device: torch.device) -> str:
    """The dtype key the run's matrix products use: fp32 runs count as tf32 when TF32 is on."""
    if precision == "fp32" and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return precision


def tf32_applies(allowed: bool, capability: tuple[int, int] | None) -> bool:
    """Whether fp32 matrix products may use TF32: asked for (train.allow_tf32) and on a CUDA
    device (capability not None) of compute capability >= 8.0, the first with TF32 units."""
    return allowed and capability is not None and capability >= (8, 0)


def configure_tf32(device: torch.device, allowed: bool) -> bool:
    """Set torch.backends.cuda.matmul.allow_tf32 and cudnn.allow_tf32 for this CUDA device as
    `tf32_applies` says; returns that decision. The CPU has no TF32 and is left alone."""
    if device.type != "cuda":
        return False
    on = tf32_applies(allowed, torch.cuda.get_device_capability(device))
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return on


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device for this precision, or None for a GPU not in the table."""
    dtype = matmul_dtype(precision, device)
    if device.type == "cpu":
        return cpu_peak_flops(dtype)
    if device.type == "cuda":
        kind = gpu_kind(torch.cuda.get_device_name(device))
        return PEAK_TFLOPS[kind][dtype] * 1e12 if kind is not None else None
    return None


def describe_peak(device: torch.device, precision: str, peak: float | None) -> str:
    """The start-up line that says what MFU is measured against."""
    if peak is None:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
        return f"no MFU: {name} is not in the peak table of pretrain/devices.py"
    dtype = matmul_dtype(precision, device)
    source = "measured on this CPU, cached" if device.type == "cpu" else "datasheet"
    return f"device peak {peak / 1e12:.3g} TFLOP/s for {dtype} matrix products ({source})"


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bert-pretrain" / "device_peaks.json"


def _cpu_key(dtype: str) -> str:
    model_name = _cpu_model_name() or platform.machine()
    return f"{model_name}|threads={torch.get_num_threads()}|{dtype}|torch={torch.__version__}"


def _cpu_model_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def read_cache() -> dict[str, float]:
    """The cached CPU peaks (FLOP/s by key); empty when absent or unreadable."""
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cpu_peak_flops(dtype: str) -> float:
    """This CPU's matrix-product rate in `dtype` (FLOP/s): measured now, and the highest rate
    measured so far on this machine kept in the cache and returned. Other work on the machine
    can only make one measurement low; the cached maximum climbs to what the CPU can do."""
    key = _cpu_key(dtype)
    cached = read_cache().get(key)
    best = max(measure_cpu_matmul(_CPU_DTYPES[dtype]), float(cached or 0.0))
    if best != cached:
        _write_cache(key, best)
    return best


def measure_cpu_matmul(dtype: torch.dtype) -> float:
    """Best FLOP/s of an n x n matrix product over repetitions for about a third of a second.

    n is sized from a first rate at n = 256 so that one product takes ~50 ms: 1024 where the
    dtype runs natively, 256 for one this CPU only emulates (fp16 without AVX512-FP16 runs at
    ~1 GFLOP/s, so one 1024 product alone would take two seconds).
    """
    # A generator of its own: the trainer's RNG state (restored on resume) must not move.
    generator = torch.Generator().manual_seed(0)
    small = torch.randn(256, 256, generator=generator).to(dtype)
    torch.mm(small, small)  # the first call pays one-off set-up costs
    begin = time.perf_counter()
    torch.mm(small, small)
    rate = 2.0 * 256**3 / max(time.perf_counter() - begin, 1e-9)
    size = int(min(1024, max(256, (rate * 0.05 / 2) ** (1 / 3))) // 128 * 128)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    start = time.perf_counter()
    for _ in range(20):
        if time.perf_counter() - start > _CPU_BUDGET_S:
            break
        begin = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - begin)
    return 2.0 * size**3 / best


def _write_cache(key: str, rate: float) -> None:
    """Merge one entry into the cache, atomically (ranks of one machine may race here)."""
    path = cache_path()
    data = read_cache()
    data[key] = rate
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        temp.replace(path)
    except OSError:  # a read-only home: this run still uses what it measured
        return
