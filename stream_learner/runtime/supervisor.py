"""``stream-learner run --processes N``: N workers of one consumer group on this machine.

Each worker is a child process running ``stream-learner run`` with the same settings plus
its own worker id (``<id>-<i>``), checkpoint sub-directory (``<dir>/worker-<i>``) and metrics
port (``<port>+i``). The settings, passwords and the checkpoint key go to the children through
their environment (``STREAM_LEARNER_*``, readable by the same user only), never their command
line, which every user sees in ``ps``. Kafka spreads the partitions over them (and over the
workers of any other machine in the group). The supervisor

* forwards SIGTERM / SIGINT, so every worker finishes its batch, checkpoints and commits;
* restarts a worker that died (kill -9, out of memory) with a growing delay; meanwhile the
  group hands its partitions to the others, which start from the committed offsets;
* stops everything when a worker exits with code 2 (bad settings: restarting cannot help);
* exits when every worker has exited by itself (``--stop-when-idle``), with the worst code.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from stream_learner.io.retry import Backoff
from stream_learner.runtime.config import ENV_PREFIX, WorkerConfig, to_environment, worker_id
from stream_learner.state.checkpoint import KEY_ENV, resolve_key

__all__ = ["Supervisor", "child_arguments"]

log = logging.getLogger(__name__)

CONFIG_ERROR = 2


def child_arguments(config: WorkerConfig, index: int) -> list[str]:
    """The flags that make child ``index`` a distinct worker (appended: the last flag wins).

    >>> config = WorkerConfig(topics=("t",), worker_id="node7", metrics_port=9400)
    >>> child_arguments(config, 1)
    ['--processes', '1', '--worker-id', 'node7-1', '--checkpoint-dir', 'checkpoints/worker-1', '--metrics-port', '9401']
    """
    arguments = [
        "--processes", "1",
        "--worker-id", f"{worker_id(config)}-{index}",
        "--checkpoint-dir", str(Path(config.checkpoint_dir) / f"worker-{index}"),
    ]
    if config.metrics_port is not None:
        port = 0 if config.metrics_port == 0 else config.metrics_port + index
        arguments += ["--metrics-port", str(port)]
    return arguments


class Supervisor:
    """Starts, watches and stops the worker processes.

    ``python`` runs a child (the current interpreter by default). ``argv``, the command line
    as given, is no longer passed on: the children get every setting from ``config``.
    """

    def __init__(
        self,
        config: WorkerConfig,
        argv: Sequence[str] = (),
        *,
        python: str = sys.executable,
        restart_delay: float = 1.0,
        max_restart_delay: float = 30.0,
    ):
        self.config = config
        self.argv = list(argv)
        self.python = python
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self.children: dict[int, subprocess.Popen] = {}
        self.exit_codes: dict[int, int] = {}
        self.restarts: dict[int, int] = {}
        self._backoffs: dict[int, Backoff] = {}
        self._stopping = threading.Event()

    def _backoff(self, index: int) -> Backoff:
        """Worker ``index``'s restart delays: growing from ``restart_delay`` up to
        ``max_restart_delay``, with decorrelated jitter so that workers killed together (out
        of memory, a broker gone) do not restart in step."""
        if index not in self._backoffs:
            self._backoffs[index] = Backoff(self.restart_delay, self.max_restart_delay, jitter="decorrelated")
        return self._backoffs[index]

    def _environment(self) -> dict[str, str]:
        # The resolved settings (flags, environment and TOML file alike) replace the
        # supervisor's own STREAM_LEARNER_* settings.
        settings = to_environment(self.config)
        env = {k: v for k, v in os.environ.items() if k != ENV_PREFIX + "CONFIG"}
        env.update(settings)
        # One key for every worker (they read each other's signed snapshots), resolved once
        # here so that a missing key stops everything with one clear message.
        key = resolve_key(
            self.config.checkpoint_dir, self.config.checkpoint_key_file, generate=self.config.generate_key
        )
        if not self.config.checkpoint_key_file:  # else each worker reads the same file
            env[KEY_ENV] = key.decode("utf-8", "surrogateescape")
        return env

    def _start(self, index: int, env: dict[str, str]) -> None:
        command = [self.python, "-m", "stream_learner.cli.main", "run", *child_arguments(self.config, index)]
        # Its own session: a Ctrl-C in the terminal reaches the supervisor only, which
        # forwards one SIGTERM (a second signal would make a worker exit at once).
        self.children[index] = subprocess.Popen(command, env=env, start_new_session=True)
        log.info("worker %d started (pid %d)", index, self.children[index].pid)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask every worker to finish its batch, checkpoint and exit."""
        self._stopping.set()
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signum)

    def run(self, poll_every: float = 0.2) -> int:
        from stream_learner.state.checkpoint import CheckpointError
        from stream_learner.state.files import private_directory

        private_directory(self.config.checkpoint_dir)
        try:
            env = self._environment()
        except CheckpointError as error:
            log.error("%s", error)
            return CONFIG_ERROR
        for index in range(self.config.processes):
            self._start(index, env)
        due: dict[int, float] = {}  # restart times of dead workers
        try:
            while self.children or due:
                for index, child in list(self.children.items()):
                    code = child.poll()
                    if code is None:
                        continue
                    del self.children[index]
                    self.exit_codes[index] = code
                    if self._stopping.is_set() or code == 0:
                        log.info("worker %d exited (code %d)", index, code)
                    elif code == CONFIG_ERROR:
                        log.error("worker %d refused its settings (code 2): stopping all workers", index)
                        self.stop()
                    else:
                        self.restarts[index] = self.restarts.get(index, 0) + 1
                        delay = self._backoff(index).next()
                        log.warning("worker %d died (code %d); restarting it in %.0f s", index, code, delay)
                        due[index] = time.monotonic() + delay
                for index, when in list(due.items()):
                    if self._stopping.is_set():
                        del due[index]
                    elif time.monotonic() >= when:
                        del due[index]
                        self._start(index, env)
                time.sleep(poll_every)
        finally:
            deadline = time.monotonic() + self.config.shutdown_timeout + 10.0
            for child in self.children.values():
                try:
                    child.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.kill()
        codes = list(self.exit_codes.values())
        return max(codes, default=0)


def run_processes(config: WorkerConfig, argv: Sequence[str] = ()) -> int:
    """Supervise ``config.processes`` workers until they exit or a signal stops them."""
    supervisor = Supervisor(config, argv)

    def request_stop(signum, _frame):
        if supervisor._stopping.is_set():
            log.warning("%s again: killing the workers", signal.Signals(signum).name)
            for child in supervisor.children.values():
                child.kill()
            return
        log.info("%s received: stopping %d workers", signal.Signals(signum).name, len(supervisor.children))
        supervisor.stop(signal.SIGTERM)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)
    log.info("starting %d worker processes in group %s", config.processes, config.group_id)
    return supervisor.run()
