"""A child of ``ringserve serve`` stops when the process that started it is gone.

The launcher (or ``ringserve frontend``'s pool) stops its engine and workers in order when it is
asked to. Killed with SIGKILL, it can do nothing, and its children would go on serving as
orphans: the workers would hold the port, and the engine would hold the run directory's lock, so
the next ``ringserve serve`` could not start. Linux's ``PR_SET_PDEATHSIG`` has the kernel send the
child a signal when its parent exits. With SIGTERM, the engine and the workers stop as on any
SIGTERM: the workers drain and remove their rings, and the engine removes its socket.
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent(sig: signal.Signals = signal.SIGTERM) -> bool:
    """Ask for ``sig`` when the parent exits; False where the kernel offers no such thing."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # not Linux
        return False
    if os.getppid() != parent:  # the parent died before the call: nobody would send the signal
        os.kill(os.getpid(), sig)
    return True
