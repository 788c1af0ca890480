"""The child interpreters of the process transports (``ProcessSource``, ``ProcessSink``).

A plain ``python -m <module> <fd>`` child, not multiprocessing's spawn (which re-imports the
caller's ``__main__``), talking to its parent over a socket pair. The parent sends one setup
message first; the child ignores Ctrl-C and SIGTERM, which are for the worker: it closes its
children in order.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
from multiprocessing.connection import Connection

from stream_learner.io.logs import quiet_kafka_client_logs

__all__ = ["spawn", "start_child"]


def spawn(module: str) -> tuple[subprocess.Popen, Connection]:
    """Start ``python -m module`` with one end of a socket pair → (process, our end)."""
    ours, theirs = socket.socketpair()
    process = subprocess.Popen(
        [sys.executable, "-m", module, str(theirs.fileno())],
        pass_fds=(theirs.fileno(),),
        stdin=subprocess.DEVNULL,
    )
    theirs.close()
    return process, Connection(ours.detach())


def start_child(fd: int) -> tuple[Connection, tuple] | None:
    """In the child: its end of the pair and the parent's setup message, whose last item is the
    parent's log level; None if the parent went away first."""
    conn = Connection(fd)
    try:
        setup = conn.recv()
    except (EOFError, OSError):
        return None
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log_level = setup[-1]
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_kafka_client_logs(log_level)  # as the worker does: our log lines say what went wrong
    return conn, setup
