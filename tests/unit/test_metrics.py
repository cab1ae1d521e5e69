"""metrics.jsonl on resume: lines past the checkpoint and a line cut by a hard kill are dropped."""

import json

from pretrain.metrics import MetricsLog, read_records


def test_resume_keeps_the_steps_up_to_the_checkpoint_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 10.0 - s} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    assert read_records(path) == rows
    MetricsLog(tmp_path, resume_step=2).close()
    assert read_records(path) == rows[:2]
    assert path.read_text().endswith("}\n")  # appending continues on a fresh line
