"""Progress while encoding and the final summary table.

On a terminal: a tqdm bar over input bytes (MB/s and ETA) with documents/s and tokens/s beside
it. Otherwise (batch jobs, CI, `| tee`): one plain line every `log_every` seconds, which a log
file can hold without carriage-return noise.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import TextIO

from tqdm import tqdm


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB.

    Linux's VmHWM, which starts afresh at exec. getrusage's ru_maxrss does not: a process
    started by a big parent (fork + exec) reports the parent's size at the fork as its own
    peak, which would blame `bert-prep` for its caller's memory.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts input bytes, documents and tokens; shows them as a bar or as log lines."""

    def __init__(
        self,
        total_bytes: int,
        done_bytes: int = 0,
        *,
        desc: str = "encode",
        log_every: float = 30.0,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.total = max(1, total_bytes)
        self.initial = done_bytes
        self.bytes = done_bytes
        self.docs = 0
        self.tokens = 0
        self.desc = desc
        self.log_every = log_every
        self.start = time.monotonic()
        self._last_log = self.start
        self._last_postfix = 0.0
        self._bar = None
        if self.stream.isatty():
            self._bar = tqdm(
                total=self.total,
                initial=done_bytes,
                unit="B",
                unit_scale=True,
                desc=desc,
                file=self.stream,
                dynamic_ncols=True,
            )

    def update(self, nbytes: int, docs: int, tokens: int) -> None:
        self.bytes += nbytes
        self.docs += docs
        self.tokens += tokens
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(nbytes)
            if now - self._last_postfix > 0.5:
                elapsed = max(1e-9, now - self.start)
                self._bar.set_postfix_str(
                    f"{self.docs / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tokens/s",
                    refresh=False,
                )
                self._last_postfix = now
        elif now - self._last_log >= self.log_every:
            self._last_log = now
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = max(1e-9, time.monotonic() - self.start)
        rate = (self.bytes - self.initial) / elapsed
        eta = (self.total - self.bytes) / rate if rate > 0 else float("inf")
        eta_text = _duration(eta) if eta != float("inf") else "?"
        return (
            f"{self.desc}: {100 * self.bytes / self.total:5.1f}% "
            f"{self.bytes / 1e6:,.1f}/{self.total / 1e6:,.1f} MB, {rate / 1e6:.2f} MB/s, "
            f"{self.docs / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tokens/s, "
            f"ETA {eta_text}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def summary_table(manifest: dict) -> str:
    """The final report: counts, drops by reason, skipped files, time, throughput, memory."""
    stats = manifest.get("stats", {})
    run = manifest.get("run", {})
    dropped = stats.get("dropped", {})
    skipped = stats.get("skipped_files", {})
    truncated = stats.get("truncated_files", 0)
    elapsed = run.get("elapsed_s")
    rows = [
        ("shards", f"{len(manifest['shards'])}"),
        (
            "files",
            f"{stats.get('files', 0):,}"
            + (
                " (skipped: " + ", ".join(f"{k} {v}" for k, v in skipped.items()) + ")"
                if any(skipped.values())
                else ""
            )
            + (f" (truncated, the part before the damage kept: {truncated})" if truncated else ""),
        ),
        ("input", f"{stats.get('bytes', 0) / 1e6:,.1f} MB"),
        ("documents read", f"{stats.get('documents', 0):,}"),
        ("documents kept", f"{manifest['num_documents']:,}"),
        ("dropped", ", ".join(f"{k} {v:,}" for k, v in dropped.items()) or "none"),
        ("duplicates", f"{dropped.get('duplicate', 0):,}"),
        (
            "bad lines",
            f"undecodable {stats.get('invalid_utf8_lines', 0):,}, invalid JSON "
            f"{stats.get('invalid_json_lines', 0):,}, records without the text field "
            f"{stats.get('missing_field_records', 0):,}",
        ),
        ("sentences", f"{manifest['num_sentences']:,}"),
        ("tokens", f"{manifest['num_tokens']:,} ({manifest['dtype']})"),
    ]
    if elapsed:
        rows.append(
            (
                "time",
                f"{elapsed:,.1f} s ({run.get('workers', 1)} worker(s), "
                f"{run.get('world_size', 1)} rank(s))",
            )
        )
        encoded = run.get("encoded_bytes", stats.get("bytes", 0))
        rows.append(
            (
                "throughput",
                f"{encoded / 1e6 / elapsed:,.2f} MB/s, "
                f"{run.get('encoded_documents', 0) / elapsed:,.0f} docs/s, "
                f"{run.get('encoded_tokens', 0) / elapsed:,.0f} tokens/s",
            )
        )
    if "peak_rss_mb" in run:
        rss = run["peak_rss_mb"]
        rows.append(
            (
                "peak memory",
                f"{rss['main']:,.0f} MB (this process), {rss['workers']:,.0f} MB (largest worker)",
            )
        )
    width = max(len(name) for name, _ in rows)
    lines = [f"  {name:<{width}}  {value}" for name, value in rows]
    problems = manifest.get("problems", [])
    for path, reason in problems[:10]:
        verb = "read in part" if reason.startswith("truncated") else "skipped"
        lines.append(f"  {verb} {path}: {reason}")
    if len(problems) > 10:
        lines.append(f"  ... and {len(problems) - 10} more file problem(s), see manifest.json")
    return "\n".join(lines)
