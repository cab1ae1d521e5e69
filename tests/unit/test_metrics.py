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


def test_the_rewrite_on_resume_is_atomic(tmp_path):
    """A write that fails midway (a file-size limit in a subprocess stands in for a full disk
    or a kill) leaves the old history whole; before, the file was truncated first and lost it.
    Oracle: the file's bytes before the attempt."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 3001)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = path.read_bytes()
    code = (
        "import resource, signal; from pathlib import Path;"
        "from pretrain.metrics import MetricsLog;"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000));"
        f"MetricsLog(Path({str(tmp_path)!r}), resume_step=2500)"
    )
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=repo,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
        timeout=120,
    )
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary left
