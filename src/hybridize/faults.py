"""Crash injection for resumability tests: `HYBRIDIZE_KILL_AT=<point>` SIGKILLs the process there.

The runner and checkpoint writer name their critical points; a test sets the variable, runs
`hybridize run` in a subprocess, and checks that running it again ends exactly like a run that was
never interrupted. Unset (always, outside tests), a point costs one dictionary lookup.
"""

import os
import signal


def kill_point(name: str) -> None:
    if os.environ.get("HYBRIDIZE_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
