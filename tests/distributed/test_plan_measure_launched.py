"""bert-plan --measure started by a launcher on two "nodes" (two processes of this machine whose
launcher variables say one rank per node): every rank takes part in the all-reduce across nodes,
rank 0 alone calibrates and stores, and the stored network figures are what later plans use.

Oracle: the calibration file read back (its network figures are the across-node measurement,
its link figures the 2-process one) and the time model's rates built from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.distributed.harness import run_distributed

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "data.seq_len=32",
    "train.micro_batch=4",
    "train.global_batch=8",
    "model.vocab_size=203",
    "train.precision=fp32",
]


def _measure_as_one_rank_per_node(cache: str) -> tuple[int, str]:
    import contextlib
    import io

    from pretrain import plan as plan_cli

    os.environ.update(XDG_CACHE_HOME=cache, LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = plan_cli.main(
            ["--config", str(REPO / "configs" / "tiny.yaml"), "--cluster", "cpu", "--measure"]
            + SMALL
        )
    return code, printed.getvalue()


@pytest.mark.slow
def test_measure_under_a_launcher_stores_the_network_across_nodes(tmp_path):
    (code0, out0), (code1, out1) = run_distributed(
        _measure_as_one_rank_per_node, 2, str(tmp_path), timeout_s=600
    )
    assert code0 == code1 == 0
    assert "gloo all-reduce across 2 nodes, 2 ranks" in out0 and "calibration stored" in out0
    assert out1 == ""  # rank 1 took part in the all-reduce and left the rest to rank 0
    stored = json.loads((tmp_path / "bert-pretrain" / "plan_calibration.json").read_text())
    assert stored
    for entry in stored.values():
        assert entry["network_bytes_per_s"] > 0 and entry["network_latency_s"] > 0
        assert entry["link_bytes_per_s"] > 0

    from pretrain.config import load_config, resolve_model_shape
    from pretrain.plan_measure import Calibration, rates_from

    shape = resolve_model_shape(load_config(REPO / "configs" / "tiny.yaml", SMALL), 203)
    for entry in stored.values():
        rates = rates_from(Calibration(**entry), shape)
        assert rates.network_bytes_per_s == entry["network_bytes_per_s"]
        assert rates.network_latency_s == entry["network_latency_s"]
        assert rates.link_bytes_per_s == entry["link_bytes_per_s"]
