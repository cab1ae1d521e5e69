"""`[rank R host H]` in front of what ranks other than 0 print to stderr.

Only rank 0 logs progress, but any rank can fail or warn. In a job's single output file a
traceback from rank 13 looks like one from rank 0; with the tag, a user sees which rank and
which node (a bad GPU, a full disk) at a glance. Rank 0 keeps printing as it always did.

`install` covers our one-line errors (the CLI prefixes them with `tag`), Python warnings and
uncaught tracebacks (every line, so a tagged traceback can be grepped out of the job log).
"""

from __future__ import annotations

import socket
import sys
import traceback
import warnings
from types import TracebackType

from launch.env import detect_environment
from launch.errors import LaunchError


def rank_tag() -> str:
    """`"[rank 3 host gpu-a02] "` on ranks other than 0; `""` on rank 0, alone, or when the
    launcher's variables are malformed (that error is reported on its own, untagged)."""
    try:
        rank = detect_environment().rank
    except LaunchError:
        return ""
    if rank == 0:
        return ""
    return f"[rank {rank} host {socket.gethostname().split('.')[0]}] "


def tag_lines(tag: str, text: str) -> str:
    """Put `tag` in front of every line of `text`."""
    return "".join(tag + line for line in text.splitlines(keepends=True))


def install(tag: str) -> None:
    """Tag this process's Python warnings and uncaught tracebacks (no-op for an empty tag)."""
    if not tag:
        return
    format_warning = warnings.formatwarning

    def tagged_warning(*args, **kwargs) -> str:  # same signature as warnings.formatwarning
        return tag_lines(tag, format_warning(*args, **kwargs))

    def tagged_traceback(
        kind: type[BaseException], error: BaseException, trace: TracebackType | None
    ) -> None:
        sys.stderr.write(tag_lines(tag, "".join(traceback.format_exception(kind, error, trace))))
        sys.stderr.flush()

    warnings.formatwarning = tagged_warning
    sys.excepthook = tagged_traceback
