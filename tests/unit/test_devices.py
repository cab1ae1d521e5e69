"""The device peak table and the CPU's measured, cached peak.

Oracles: the device names `torch.cuda.get_device_name` returns on the GPUs of the table (as
printed by nvidia-smi on those machines); the datasheet relations between dtypes; and, for the
CPU, an independent timing of the same matrix product and the cache file read back.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from pretrain.devices import (
    PEAK_TFLOPS,
    cache_path,
    configure_tf32,
    cpu_peak_flops,
    gpu_kind,
    measure_cpu_matmul,
    peak_flops,
    tf32_applies,
)


@pytest.mark.parametrize(
    "name, kind",
    [
        ("Tesla V100-SXM2-16GB", "V100-SXM2"),
        ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA H100 80GB HBM3", "H100-SXM"),
        ("NVIDIA H200", "H200"),
        ("Tesla V100-PCIE-16GB", None),  # lower clocks than SXM2: not in the table
        ("NVIDIA H100 PCIe", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_gpu_names_map_to_table_entries(name: str, kind: str | None) -> None:
    assert gpu_kind(name) == kind


def test_table_is_complete_and_consistent() -> None:
    for kind, peaks in PEAK_TFLOPS.items():
        assert set(peaks) == {"fp32", "tf32", "fp16", "bf16"}, kind
        assert peaks["fp16"] >= peaks["tf32"] >= peaks["fp32"] > 0, kind
    # Volta has no bf16 tensor cores: its bf16 rate is the emulated one, not fp16's.
    assert PEAK_TFLOPS["V100-SXM2"]["bf16"] == PEAK_TFLOPS["V100-SXM2"]["fp32"]
    assert PEAK_TFLOPS["A100-80GB"]["bf16"] == 312.0


def test_cpu_peak_is_measured_quickly_and_the_cache_keeps_the_best(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    begin = time.perf_counter()
    rate = cpu_peak_flops("fp32")
    assert time.perf_counter() - begin < 2.0
    assert cache_path().is_relative_to(tmp_path)
    (key,) = json.loads(cache_path().read_text())
    assert json.loads(cache_path().read_text()) == {key: rate}
    # A higher rate in the cache (an earlier measurement on an idle machine) is what counts.
    cache_path().write_text(json.dumps({key: 1e15}))
    assert peak_flops(torch.device("cpu"), "fp32") == 1e15
    # A lower one is replaced by this measurement.
    cache_path().write_text(json.dumps({key: 1.0}))
    again = peak_flops(torch.device("cpu"), "fp32")
    assert again > 1.0 and json.loads(cache_path().read_text()) == {key: again}
    # Independent timing of a 1024 x 1024 product: the "peak" is the best repetition, so an
    # average of a few can be slower, but not by orders of magnitude (units, sizes).
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    begin = time.perf_counter()
    for _ in range(3):
        torch.mm(a, b)
    independent = 3 * 2 * 1024**3 / (time.perf_counter() - begin)
    assert 0.05 < independent / max(rate, again) < 5.0


def test_measuring_leaves_the_global_rng_alone(tmp_path, monkeypatch) -> None:
    """The trainer measures after restoring a checkpoint's RNG state: resume must stay exact."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    cpu_peak_flops("fp32")
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_precision_measurement_stays_short(dtype: torch.dtype) -> None:
    """fp16 has no native GEMM on these CPUs (about 1 GFLOP/s): the size must adapt. (A fixed
    1024^3 product would take minutes; the budget is ~1 s, checked at 6 s for loaded machines.)"""
    begin = time.perf_counter()
    rate = measure_cpu_matmul(dtype)
    assert time.perf_counter() - begin < 6.0
    assert rate > 1e8


@pytest.mark.parametrize(
    ("allowed", "capability", "expected"),
    [
        (True, (7, 0), False),
        (True, (8, 0), True),
        (True, (9, 0), True),
        (False, (9, 0), False),
        (True, None, False),
    ],
)
def test_tf32_only_from_compute_capability_8(allowed, capability, expected) -> None:
    """TF32 units exist from Ampere (8.0): V100 (7.0) and the CPU (no capability) never get it,
    and train.allow_tf32=false turns it off everywhere."""
    assert tf32_applies(allowed, capability) is expected


def test_configure_tf32_leaves_the_cpu_alone() -> None:
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    assert configure_tf32(torch.device("cpu"), True) is False
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
