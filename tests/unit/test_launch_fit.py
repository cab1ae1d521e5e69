"""bert-launch with a cluster file's fitted layouts (launch/fit.py): the layout's keys go into the
job script, too few nodes are refused in one line, the user's own layout keys win.

Oracle: the cluster files' `layouts:` entries themselves (their correctness against the memory
estimator is tests/unit/test_memory.py's job) and the rendered script text.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launch import cli

REPO = Path(__file__).resolve().parents[2]
ABCI2 = str(REPO / "configs" / "cluster" / "abci2.yaml")
XLARGE = str(REPO / "configs" / "xlarge.yaml")


def _entry(size: str, seq_len: int) -> dict:
    return yaml.safe_load(Path(ABCI2).read_text())["layouts"][size][f"seq{seq_len}"]


def test_fitted_layout_is_written_into_the_script(capsys):
    """xlarge at seq 512 on V100 nodes: the four layout keys follow the user's overrides."""
    entry = _entry("xlarge", 512)
    args = ["sge", "--cluster", ABCI2, "--nodes", str(entry["min_nodes"]), "--dry-run", "--"]
    assert cli.main([*args, "bert-train", "--config", XLARGE, "data.seq_len=512"]) == 0
    script = capsys.readouterr().out
    for key in ("parallel.tp", "parallel.zero", "train.recompute", "train.micro_batch"):
        assert f"{key}={entry[key]}" in script
    assert "#$ -l rt_F=" in script  # gpus_per_node 4 comes from the hardware section


def test_too_few_nodes_is_refused_in_one_line(capsys):
    """3.9B at seq 128 needs the file's node count; one fewer is a usage error (exit 2)."""
    need = _entry("3.9b", 128)["min_nodes"]
    assert need > 1
    config = str(REPO / "configs" / "3.9b.yaml")
    args = ["sge", "--cluster", ABCI2, "--nodes", str(need - 1), "--dry-run", "--"]
    assert cli.main([*args, "bert-train", "--config", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--nodes {need}" in err[0]


def test_node_count_that_breaks_the_global_batch_is_refused(capsys):
    """xlarge on 192 V100 nodes (Kasagi et al.'s 768 GPUs): the fitted tp 2 gives dp 384, and
    micro-batch 16 x 384 = 6144 does not divide the global batch 8192, which bert-train would
    refuse only once the job runs. bert-launch refuses it in one line (exit 2) with the nearest
    node counts that divide (128: 4096 per step, 256: 8192), and accepts the same nodes with a
    global batch that is a multiple of 6144."""
    entry = _entry("xlarge", 128)
    assert (entry["parallel.tp"], entry["train.micro_batch"]) == (2, 16)
    args = ["sge", "--cluster", ABCI2, "--nodes", "192", "--dry-run", "--"]
    assert cli.main([*args, "bert-train", "--config", XLARGE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.global_batch=8192" in err[0]
    assert "--nodes 128 or 256" in err[0] and "multiple of 6144" in err[0]
    assert cli.main([*args, "bert-train", "--config", XLARGE, "train.global_batch=12288"]) == 0
    assert "train.micro_batch=16" in capsys.readouterr().out


def test_user_layout_keys_win(capsys):
    """A command that sets a layout key keeps its own layout; nothing is appended or refused."""
    config = str(REPO / "configs" / "3.9b.yaml")
    args = ["sge", "--cluster", ABCI2, "--nodes", "1", "--dry-run", "--"]
    assert cli.main([*args, "bert-train", "--config", config, "parallel.tp=4"]) == 0
    captured = capsys.readouterr()
    assert "train.recompute=" not in captured.out and "own layout" in captured.err


def test_config_without_entry_is_left_alone(capsys):
    """configs/base.yaml has no entry: the command is written as given."""
    config = str(REPO / "configs" / "base.yaml")
    args = ["sge", "--cluster", ABCI2, "--nodes", "1", "--dry-run", "--"]
    assert cli.main([*args, "bert-train", "--config", config]) == 0
    assert "parallel.tp=" not in capsys.readouterr().out


HARDWARE = (
    "{gpu: X, gpu_memory_gib: 16, gpus_per_node: 4, nvlink_gb_per_s: 150, internode_gb_per_s: 25}"
)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("gpu_memory_gib: 16", "gpu_memory_gib: 0"), "hardware.gpu_memory_gib must be a positive"),
        (("nvlink_gb_per_s: 150", "nvlink_gb_per_s: -1"), "hardware.nvlink_gb_per_s must be"),
        ((", internode_gb_per_s: 25", ""), "(missing internode_gb_per_s)"),
        (("gpus_per_node: 4", "gpus_per_node: 2.5"), "gpus_per_node must be an integer"),
    ],
)
def test_bad_hardware_section(tmp_path: Path, capsys, change, message):
    """A missing or non-positive hardware field: one line naming it, exit 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"scheduler: sge\nhardware: {HARDWARE.replace(*change)}\n")
    assert cli.main(["sge", "--cluster", str(bad), "--dry-run", "--", "bert-train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_builtin_cluster_by_name(capsys):
    """`--cluster abci2` is configs/cluster/abci2.yaml: its resource type and 4 GPUs per node."""
    assert cli.main(["sge", "--cluster", "abci2", "--dry-run", "--", "bert-train"]) == 0
    assert "#$ -l rt_F=1" in capsys.readouterr().out


def test_unknown_cluster_lists_the_known_ones(capsys):
    """An unknown name: one line listing every built-in cluster, exit 2."""
    assert cli.main(["sge", "--cluster", "abci9", "--dry-run", "--", "bert-train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown cluster 'abci9'" in err[0]
    for name in ("abci2", "abci2-a", "abci3", "cpu", "gridengine", "h100"):
        assert name in err[0]


def test_cpu_cluster_sets_ranks_not_gpus(capsys):
    """The cpu cluster's hardware is one rank per core: 2 ranks per node, no GPU request."""
    assert cli.main(["mpirun", "--cluster", "cpu", "--dry-run", "--", "bert-train"]) == 0
    script = capsys.readouterr().out
    assert "RANKS_PER_NODE=2" in script and "--nv" not in script


def test_the_cluster_goes_into_the_training_command(capsys, tmp_path):
    """bert-train compares its first intervals with the plan for train.cluster: a built-in name
    is written as the name, the user's own file as an absolute path (a PBS job starts in $HOME),
    a command that sets train.cluster keeps it, and a command without --config is left alone."""
    config = str(REPO / "configs" / "base.yaml")
    args = ["sge", "--nodes", "1", "--dry-run"]
    assert cli.main([*args, "--cluster", "abci2", "--", "bert-train", "--config", config]) == 0
    assert "train.cluster=abci2 " in capsys.readouterr().out
    own = tmp_path / "site.yaml"
    own.write_text(Path(ABCI2).read_text())
    relative = own.relative_to(Path.cwd()) if own.is_relative_to(Path.cwd()) else own
    assert (
        cli.main([*args, "--cluster", str(relative), "--", "bert-train", "--config", config]) == 0
    )
    assert f"train.cluster={own.resolve()}" in capsys.readouterr().out
    command = ["bert-train", "--config", config, "train.cluster=abci3"]
    assert cli.main([*args, "--cluster", "abci2", "--", *command]) == 0
    out = capsys.readouterr().out
    assert "train.cluster=abci3" in out and "train.cluster=abci2" not in out
    assert cli.main([*args, "--cluster", "abci2", "--", "python", "my_script.py"]) == 0
    assert "train.cluster" not in capsys.readouterr().out
