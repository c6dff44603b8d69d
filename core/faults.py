"""Failpoints: named places in multi-step operations where a test can kill dbdeck or make the step fail.

Production code calls `point("rewind.moved-aside")` between steps. Nothing happens unless the
DBDECK_FAILPOINT environment variable names that point (a comma-separated list may name several):
`NAME` kills this process with SIGKILL on the spot (the same as a power cut or an OOM kill, no cleanup
runs), `NAME:error` raises a DbdeckError instead (a step that fails), `NAME:sigterm` sends this process SIGTERM
(systemd's stop, timeout(1)) as the step begins. The fault-injection tests use it
to prove invariants at every step, e.g. that a fenced
node can never come back writable.
"""

import os
import signal

from .errors import DbdeckError

VARIABLE = "DBDECK_FAILPOINT"


def point(name):
    for wanted in os.environ.get(VARIABLE, "").split(","):
        target, _, how = wanted.strip().partition(":")
        if target != name:
            continue
        if how == "error":
            raise DbdeckError(f"injected failure at {name} ({VARIABLE})")
        os.kill(os.getpid(), signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
