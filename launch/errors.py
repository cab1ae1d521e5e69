"""The one exception type of `launch`: a user error with a one-line message saying what to fix."""

from __future__ import annotations


class LaunchError(ValueError):
    """Wrong or missing launcher environment, host files, options or tools.

    The message is one line that names what to set or install, e.g.
    "Open MPI started 4 ranks but MASTER_ADDR is not set and mpi4py is not installed: ...".
    """
