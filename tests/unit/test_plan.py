"""bert-plan (pretrain/plan.py, plan_model.py, plan_published.py): the search, the time model's
parts against their references, the published figures, the CLI's output and one-line errors.

Oracles: pretrain/memory.py's estimate for what fits (the search must agree with it layout by
layout); NVIDIA's published BERT-Large throughputs (plan_published.py) for the fitted and
held-out predictions; the ring all-reduce cost written out by hand; bert-launch's own script
for --emit; the arguments themselves for the error messages.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pretrain import plan as plan_cli
from pretrain.config import ConfigError, ModelShape, load_config, resolve_model_shape
from pretrain.memory import (
    GiB,
    Layout,
    estimate_memory,
    parameter_counts,
    saved_activation_bytes,
)
from pretrain.plan_measure import calibration_path
from pretrain.plan_model import (
    Rates,
    _forward_gemms,
    dp_comm_seconds,
    step_time,
    tp_comm_seconds,
)
from pretrain.plan_published import FIGURES, check_table, fitted_efficiency, predict

REPO = Path(__file__).resolve().parents[2]
XLARGE = str(REPO / "configs" / "xlarge.yaml")
BIG = str(REPO / "configs" / "3.9b.yaml")


def _args(*argv: str):
    return plan_cli.build_parser().parse_args(list(argv))


def test_search_is_exhaustive_and_agrees_with_the_memory_estimate():
    """xlarge on 4 ABCI V nodes (16 V100): every tp that divides 32 heads, 8192 FFN and the
    node's 4 GPUs; every power-of-two micro-batch whose x dp divides 8192; ZeRO on/off; three
    recompute modes. A layout fits exactly when memory.py's total is within 90% of the GPU."""
    plan, _, _ = plan_cli.make_plan(_args("--config", XLARGE, "--cluster", "abci2", "--nodes", "4"))
    expected = 0
    for tp in (1, 2, 4):
        dp = 16 // tp
        expected += sum(1 for mb in range(11) if 8192 % (2**mb * dp) == 0) * 2 * 3
    assert len(plan.costed) == expected
    budget = 0.9 * 15.78 * GiB
    shape = plan.shape
    for item in plan.costed:
        assert item.layout.micro_batch * item.layout.dp * item.layout.accumulation == 8192
        assert item.fits == (estimate_memory(shape, item.layout).total <= int(budget))
    fitting = [item for item in plan.costed if item.fits]
    assert plan.best is fitting[0]
    assert plan.best.time.total <= min(item.time.total for item in fitting) * 1.005


def test_fitted_figures_are_reproduced_and_held_out_ones_checked():
    """One efficiency per GPU kind reproduces its fitted NVIDIA figure; the held-out DGX A100
    multi-node figures at sequence length 128 (2-32 nodes) stay within 10% (docs/benchmarks.md
    lists every error, including the 30-35% ones at sequence length 512)."""
    for figure in FIGURES:
        if figure.fitted:
            predicted = predict(figure, fitted_efficiency(figure.gpu))
            assert predicted == pytest.approx(figure.sequences_per_s, rel=1e-3)
    assert 0.2 < fitted_efficiency("V100-SXM2") < 0.8
    assert fitted_efficiency("H200") == fitted_efficiency("A100-80GB")
    held_out = [
        row
        for row in check_table()
        if row["figure"].gpu == "A100-80GB"
        and row["figure"].nodes > 1
        and row["figure"].seq_len == 128
    ]
    assert len(held_out) == 5
    assert all(abs(row["error"]) < 0.10 for row in held_out)


RATES = Rates(
    peak_flops=100e12,
    efficiency=0.5,
    memory_bytes_per_s=1e12,
    link_bytes_per_s=100e9,
    network_bytes_per_s=25e9,
    link_latency_s=0.0,
    network_latency_s=0.0,
)
SHAPE = ModelShape(24, 2048, 32, 8192, 32768, 512, "pre", 0.1, False)


def test_data_parallel_ring_cost_and_overlap():
    """Ring all-reduce of the fp32 gradients: 2(p-1)/p x bytes / NVLink inside a node; across
    nodes each node's network carries tp groups' worth. DDP hides it behind the backward
    except the last 25 MiB bucket."""
    grads = 4 * parameter_counts(SHAPE, 1)[1]
    inside = Layout(seq_len=128, micro_batch=8, dp=4)
    exposed, whole = dp_comm_seconds(SHAPE, inside, RATES, 4, backward_s=0.0)
    assert whole == pytest.approx(2 * 3 / 4 * grads / 100e9)
    assert exposed == pytest.approx(whole)
    hidden, _ = dp_comm_seconds(SHAPE, inside, RATES, 4, backward_s=10.0)
    assert hidden == pytest.approx(whole * 25 * 1024**2 / grads)
    across = Layout(seq_len=128, micro_batch=8, dp=16, tp=2)
    grads_tp = 4 * parameter_counts(SHAPE, 2)[1]
    _, whole = dp_comm_seconds(SHAPE, across, RATES, 4, backward_s=0.0)
    assert whole == pytest.approx(2 * 2 * 15 / 16 * grads_tp / 25e9)


def test_tensor_parallel_cost_follows_the_analytic_bytes():
    """tp comm scales with the activations (micro-batch) and falls with a faster link; none at
    tp 1; full recompute all-reduces the rerun forward once more."""
    layout = Layout(seq_len=128, micro_batch=8, tp=4)
    base = tp_comm_seconds(SHAPE, layout, RATES)
    assert tp_comm_seconds(SHAPE, Layout(seq_len=128, micro_batch=8), RATES) == 0
    doubled = tp_comm_seconds(SHAPE, Layout(seq_len=128, micro_batch=16, tp=4), RATES)
    tripled = tp_comm_seconds(SHAPE, Layout(seq_len=128, micro_batch=24, tp=4), RATES)
    # Linear in the micro-batch (the activations' all-reduces), plus a positive part that does
    # not grow with it (the optimizer's norms and the per-call latency).
    assert tripled - doubled == pytest.approx(doubled - base, rel=1e-9)
    assert 2 * base - doubled > 0
    recomputed = tp_comm_seconds(
        SHAPE, Layout(seq_len=128, micro_batch=8, tp=4, recompute="full"), RATES
    )
    assert recomputed > base * 1.2


def test_recompute_costs_compute_and_sparse_head_is_cheaper():
    full = step_time(SHAPE, Layout(seq_len=128, micro_batch=8, recompute="full"), RATES, 8)
    none = step_time(SHAPE, Layout(seq_len=128, micro_batch=8), RATES, 8)
    # Exactly one more forward of the layers' products and of their elementwise work (all the
    # activations' bytes once more), not of the MLM head.
    plain = Layout(seq_len=128, micro_batch=8)
    linear, attention, _ = _forward_gemms(SHAPE, plain, RATES, half=True)
    rerun = linear + attention + saved_activation_bytes(SHAPE, plain) / RATES.memory_bytes_per_s
    assert full.compute - none.compute == pytest.approx(rerun, rel=1e-9)
    selective = step_time(
        SHAPE, Layout(seq_len=128, micro_batch=8, recompute="selective"), RATES, 8
    )
    assert none.compute < selective.compute < full.compute
    tiny = ModelShape(2, 128, 2, 512, 8000, 128, "post", 0.1, False)
    for micro_batch in (1, 4, 32):  # small shapes too: recomputing never makes a step faster
        times = [
            step_time(tiny, Layout(128, micro_batch, recompute=mode), RATES, 8).compute
            for mode in ("none", "selective", "full")
        ]
        assert times == sorted(times)
    sparse = step_time(SHAPE, Layout(seq_len=128, micro_batch=8, mlm_mode="sparse"), RATES, 8)
    assert sparse.compute < none.compute


def test_json_marks_exactly_one_best(capsys):
    argv = ["--config", XLARGE, "--cluster", "abci2-a", "--nodes", "2", "--json"]
    assert plan_cli.main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    best = [item for item in data["layouts"] if item["best"]]
    assert len(best) == 1 and best[0]["fits"]
    assert data["world_size"] == 16
    terms = best[0]["step_seconds"]
    total = terms["compute"] + terms["tp_comm"] + terms["dp_comm"] + terms["optimizer"]
    assert terms["total"] == pytest.approx(total)


def test_table_and_time_to_train(capsys):
    """The budget in tokens sets the steps; time to train is steps x the best step time."""
    argv = ["--config", XLARGE, "--cluster", "abci2", "--nodes", "192", "--tokens", "59e9"]
    assert plan_cli.main([*argv, "train.global_batch=12288"]) == 0
    out = capsys.readouterr().out
    assert "37512 steps of 12288 x 128" in out  # ceil(59e9 / (12288 x 128))
    assert out.count("\n* ") == 1 and "BEST" in out and "GPU-hours" in out


def test_emit_writes_bert_launch_script_with_the_chosen_layout(capsys):
    argv = ["--config", BIG, "--cluster", "abci3", "--nodes", "2", "--walltime", "72:00:00"]
    assert plan_cli.main([*argv, "--emit", "pbs", "--", "--group", "gX"]) == 0
    captured = capsys.readouterr()
    plan, _, _ = plan_cli.make_plan(_args(*argv))
    script = captured.out
    assert script.startswith("#!") and "#PBS -l select=2" in script and "#PBS -P gX" in script
    for key, value in plan_cli.layout_keys(plan.best.layout).items():
        assert f"{key}={value}" in script
    assert f"train.steps={plan.steps}" in script and "BEST" in captured.err
    assert "train.cluster=abci3" in script


def _one_line_error(capsys, argv: list[str], expected: str) -> None:
    assert plan_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_unknown_cluster_lists_the_known_ones(capsys):
    _one_line_error(capsys, ["--config", XLARGE, "--cluster", "abci9"], "abci2, abci2-a, abci3")


def test_walltime_must_be_hh_mm_ss(capsys):
    argv = ["--config", XLARGE, "--cluster", "abci3", "--walltime", "72h"]
    _one_line_error(capsys, argv, "not HH:MM:SS")


@pytest.mark.parametrize(
    ("hardware", "expected"),
    [
        (
            "{gpu: V100-SXM2-16GB, gpu_memory_gib: 16, gpus_per_node: 4, nvlink_gb_per_s: 150}",
            "missing internode_gb_per_s",
        ),
        (
            "{gpu: V100-SXM2-16GB, gpu_memory_gib: 16, gpus_per_node: 4, nvlink_gb_per_s: 0, "
            "internode_gb_per_s: 25}",
            "nvlink_gb_per_s must be a positive",
        ),
        (
            "{gpu: T4, gpu_memory_gib: 16, gpus_per_node: 4, nvlink_gb_per_s: 1, "
            "internode_gb_per_s: 1}",
            "not a GPU bert-plan knows",
        ),
    ],
)
def test_bad_cluster_file(tmp_path: Path, capsys, hardware: str, expected: str):
    path = tmp_path / "site.yaml"
    path.write_text(f"scheduler: slurm\nhardware: {hardware}\n")
    _one_line_error(capsys, ["--config", XLARGE, "--cluster", str(path)], expected)


def test_cluster_file_without_hardware(capsys):
    argv = ["--config", XLARGE, "--cluster", "gridengine"]
    _one_line_error(capsys, argv, "has no hardware: section")


def test_model_that_fits_nowhere_names_the_smallest_need(capsys):
    """3.9B on one 4 x V100 node: even the leanest layout exceeds 90% of 15.78 GiB; the message
    gives its size and its keys, and the size is memory.py's for that layout."""
    argv = ["--config", BIG, "--cluster", "abci2", "--nodes", "1"]
    assert plan_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "fits no layout" in err and "parallel.tp=4" in err and "\n" not in err
    config = load_config(BIG)
    shape = resolve_model_shape(config, 32768)
    smallest = min(
        estimate_memory(shape, Layout(128, mb, tp=4, recompute=r, precision="fp16")).total
        for mb in (1, 2)
        for r in ("none", "selective", "full")
    )
    assert f"needs {smallest / GiB:.1f} GiB" in err


def test_global_batch_no_layout_divides(capsys):
    """xlarge's 8,192 sequences on 192 V100 nodes (dp 192/384/768): the nearest batch that
    divides, and the nearest node counts at which 8,192 divides (dp 128 x 4 / 256 x 4 ...)."""
    argv = ["--config", XLARGE, "--cluster", "abci2", "--nodes", "192"]
    _one_line_error(
        capsys, argv, "use a multiple of 192, e.g. train.global_batch=8256, or --nodes 128 or 256"
    )


def test_walltime_shorter_than_a_checkpoint_interval(capsys):
    argv = ["--config", BIG, "--cluster", "abci3", "--nodes", "1", "--walltime", "00:20:00"]
    _one_line_error(capsys, argv, "less than one checkpoint interval")


def test_cpu_cluster_without_calibration(capsys):
    argv = ["--config", str(REPO / "configs" / "tiny.yaml"), "--cluster", "cpu"]
    _one_line_error(capsys, argv, "--measure first")


def test_fewest_nodes_that_finish_within_the_walltime(capsys):
    """Without --nodes: the smallest power-of-two node count whose best layout trains the
    tokens within one wall time; half as many nodes would not."""
    argv = ["--config", BIG, "--cluster", "abci3", "--walltime", "24:00:00", "--tokens", "30e9"]
    plan, _, _ = plan_cli.make_plan(_args(*argv))
    usable = 24 * 3600 - plan.cluster.stop_margin_s
    assert plan.train_seconds(plan.best) <= usable
    fewer, _, _ = plan_cli.make_plan(_args(*argv, "--nodes", str(plan.nodes // 2)))
    assert plan.nodes > 1 and fewer.train_seconds(fewer.best) > usable


def test_startup_prediction_for_the_runs_own_layout():
    """bert-train's start-up line: memory.py's estimate and the model's step time for the run's
    layout, on train.cluster or on the built-in cluster of the detected GPU."""
    config = load_config(XLARGE, ["parallel.tp=4", "train.micro_batch=16"])
    shape = resolve_model_shape(config, 32768)
    layout = Layout(128, 16, tp=4, dp=2, precision="fp16", accumulation=256)
    line = plan_cli.startup_prediction(config, shape, layout, "Tesla V100-SXM2-16GB").line
    assert "cluster abci2" in line
    assert f"{estimate_memory(shape, layout).total / GiB:.2f} GiB" in line
    config.train.cluster = "abci9"
    line = plan_cli.startup_prediction(config, shape, layout, "cpu").line
    assert line.startswith("plan: no prediction (unknown cluster 'abci9'")
    config.train.cluster = None
    assert "no prediction" in plan_cli.startup_prediction(config, shape, layout, "cpu").line


def test_measure_for_a_gpu_cluster_needs_its_gpu(capsys):
    """--measure for abci2 runs on one of its V100s; here, without a GPU, one line says so."""
    argv = ["--config", XLARGE, "--cluster", "abci2", "--measure"]
    _one_line_error(capsys, argv, "runs on one of its V100-SXM2 GPUs")


def test_gpu_efficiency_is_fitted_on_a_real_step():
    """--measure's GPU fit, run on the CPU (the same code with the device it is given): the
    efficiency found makes the time model reproduce a real measured step of a small config."""
    import torch

    from pretrain.plan_measure import fit_efficiency, measure_steps
    from pretrain.plan_published import gpu_rates

    config = load_config(
        REPO / "configs" / "tiny.yaml", ["data.seq_len=32", "model.vocab_size=203"]
    )
    shape = resolve_model_shape(config, 203)
    layout = Layout(32, 8, precision="fp32", mlm_mode="sparse", mask_rate=0.4)
    measured = measure_steps(shape, layout, config.mlm, torch.device("cpu"))

    def predicted(efficiency: float) -> float:
        rates = gpu_rates("V100-SXM2", "fp32", 150, 25, efficiency)
        return step_time(shape, layout, rates, 1).total

    efficiency = fit_efficiency(measured, predicted)
    assert 1e-4 < efficiency < 1.0
    assert predicted(efficiency) == pytest.approx(measured, rel=1e-6)


def test_stored_gpu_calibration_replaces_the_published_fit(tmp_path, monkeypatch):
    """What --measure stored for abci2 (its efficiency and a measured network) is what plans for
    abci2 then use, and the plan says where its efficiency came from."""
    from pretrain.plan_measure import _gpu_key, _store_entry

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    argv = ["--config", XLARGE, "--cluster", "abci2", "--nodes", "2"]
    published, _, _ = plan_cli.make_plan(_args(*argv))
    entry = {"efficiency": 0.2, "network_bytes_per_s": 3e9, "network_latency_s": 4e-5}
    _store_entry(_gpu_key("abci2", "fp16"), entry)
    measured, _, _ = plan_cli.make_plan(_args(*argv))
    cluster = plan_cli.load_cluster("abci2")
    rates, source = plan_cli.cluster_rates(cluster, "fp16", measured.shape)
    assert "measured on this cluster's GPU" in source
    assert (rates.efficiency, rates.network_bytes_per_s, rates.network_latency_s) == (
        0.2,
        3e9,
        4e-5,
    )
    layout = measured.best.layout
    assert measured.best.time.total == pytest.approx(
        step_time(measured.shape, layout, rates, 4).total
    )
    assert published.best.time.total < measured.best.time.total  # 0.2 is below the fitted 0.47


@pytest.mark.slow
def test_measure_then_plan_on_the_cpu(capsys):
    """--measure stores a calibration (in the test's own cache directory); a plan for the cpu
    cluster then uses it, and its predicted step for the calibrated layout is the measured one
    (what the calibration fits) to within the model's rounding."""
    tiny = str(REPO / "configs" / "tiny.yaml")
    small = [
        "data.seq_len=32",
        "train.micro_batch=4",
        "train.global_batch=8",
        "model.vocab_size=203",
    ]
    assert plan_cli.main(["--config", tiny, "--cluster", "cpu", "--measure", *small]) == 0
    out = capsys.readouterr().out
    assert "calibration stored" in out and "gloo all-reduce" in out
    assert plan_cli.main(["--config", tiny, "--cluster", "cpu", "--json", *small]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["world_size"] == 2 and any(item["best"] for item in data["layouts"])
    assert "measured on this CPU" in data["time_model"]
    if (os.cpu_count() or 1) >= 2:  # a rank among busy ranks was measured too, and stored
        assert "beside 1 rank(s) training the same step" in out
        stored = json.loads(calibration_path().read_text(encoding="utf-8"))
        assert any("|threads=1|ranks=2|" in key for key in stored)


def test_plans_take_the_calibration_measured_with_their_ranks_beside(tmp_path, monkeypatch):
    """Oracle: the stored entries. One rank per node takes the calibration measured alone; two
    one-thread ranks on a 2-core node the one measured beside a busy rank; four (more than
    the cores) that one too; without it the one measured alone stands in."""
    from dataclasses import asdict

    from pretrain.plan_measure import Calibration, _key, _store_entry, load_calibration

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    shape = resolve_model_shape(load_config(REPO / "configs" / "tiny.yaml", []), 1000)
    alone = Calibration(1, 1e11, 0.8, 2e10, 1e9, 1e-4, 3e9)
    _store_entry(_key("cpu", "bf16", 1), asdict(alone))
    assert load_calibration("cpu", "bf16", 2, shape).elementwise_bytes_per_s == 3e9
    _store_entry(_key("cpu", "bf16", 1, 2), asdict(alone) | {"elementwise_bytes_per_s": 2e9})
    assert load_calibration("cpu", "bf16", 1, shape).elementwise_bytes_per_s == 3e9
    assert load_calibration("cpu", "bf16", 2, shape).elementwise_bytes_per_s == 2e9
    assert load_calibration("cpu", "bf16", 4, shape).elementwise_bytes_per_s == 2e9


def test_cpu_fit_separates_bytes_from_dispatch():
    """--measure's fit: steps made by the time model itself from a known rate per byte and
    dispatch costs give those three numbers back; steps that ask for a negative term (the
    shallow model slower than the deep one, as a busy machine can measure) get the non-negative
    terms that fit best."""
    from dataclasses import replace

    import numpy as np

    from pretrain.plan_measure import Calibration, fit_elementwise, rates_from

    shape = resolve_model_shape(load_config(REPO / "configs" / "tiny.yaml", []), 1000)
    layout = Layout(128, 32, precision="fp32")
    shallow = replace(shape, layers=1)
    small = replace(layout, micro_batch=8)
    points = [(shape, layout), (shape, small), (shallow, small), (shallow, layout)]
    base = Calibration(1, 1e11, 0.8, 2e10, 1e9, 1e-4, 2e10)
    truth = {
        "elementwise_bytes_per_s": 3e9,
        "dispatch_s_per_layer": 0.02,
        "dispatch_s_per_micro_batch": 0.005,
    }

    def made(fit: dict) -> np.ndarray:
        return np.array(
            [step_time(s, lay, rates_from(replace(base, **fit), s), 1).total for s, lay in points]
        )

    assert fit_elementwise(base, points, list(made(truth))) == pytest.approx(truth, rel=1e-6)

    noisy = made(truth) * np.array([1.0, 1.0, 1.6, 1.3])
    fitted = fit_elementwise(base, points, list(noisy))
    assert min(fitted.values()) >= 0 and fitted["elementwise_bytes_per_s"] > 0
    # Non-negative least squares: no feasible set of terms fits better, the true ones included.
    assert np.sum((made(fitted) - noisy) ** 2) <= np.sum((made(truth) - noisy) ** 2)


def test_every_shipped_config_on_every_builtin_gpu_cluster():
    """bert-plan answers for each pre-training config on each built-in GPU cluster (the fewest
    nodes that fit): a best layout that fits the GPU, its keys, a positive step time."""
    from launch.fit import builtin_clusters

    configs = sorted(p for p in (REPO / "configs").glob("*.yaml"))
    clusters = [c for c in builtin_clusters() if c not in ("cpu", "gridengine")]
    assert len(configs) >= 6 and {"abci2", "abci2-a", "abci3", "h100"} <= set(clusters)
    for config in configs:
        for cluster in clusters:
            plan, _, _ = plan_cli.make_plan(_args("--config", str(config), "--cluster", cluster))
            assert plan.best is not None and plan.best.fits, (config.name, cluster)
            assert plan.best.time.total > 0 and plan.best.tokens_per_s > 0


def test_a_neighbour_that_dies_is_one_line():
    """--measure's neighbour ranks are real processes: one that fails before its first step
    (here: a vocabulary too small for its random tokens) ends the calibration in one line
    instead of leaving the measurement waiting for it."""
    from dataclasses import replace

    from pretrain.config import MLMConfig
    from pretrain.plan_measure import _busy_neighbours

    shape = resolve_model_shape(load_config(REPO / "configs" / "tiny.yaml", []), 1000)
    broken = replace(shape, vocab_size=3)  # random ids from 5 up: none exist
    with pytest.raises(ConfigError, match="died before its first step"):
        with _busy_neighbours(1, broken, Layout(32, 4, precision="fp32"), MLMConfig(), 1):
            pass
