"""The worker's configuration: one frozen object, read from flags, environment and a TOML file.

Every setting has a flag (``--checkpoint-dir``), an environment variable
(``STREAM_LEARNER_CHECKPOINT_DIR``) and a key in an optional TOML file (``checkpoint_dir``, at
the top level or in any table). A flag beats the environment, which beats the file, which
beats the default. Secrets (SASL and SSL passwords) are never shown by ``repr`` or logs, and
never taken from a flag (any user can read a command line in ``ps``): they come from the
environment, a file (``--sasl-plain-password-file``) or the TOML file.

>>> config = load_config(["--topic", "reviews", "--learners", "nb,neural"], environ={})
>>> config.topics, config.learners, config.predictions_topic, config.dead_letter_topic
(('reviews',), ('nb', 'neural'), 'reviews.predictions', 'reviews.dlq')
>>> load_config(["--topic", "t"], environ={"STREAM_LEARNER_MAX_POLL_RECORDS": "50"}).max_poll_records
50

"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "WorkerConfig",
    "ConfigError",
    "add_config_arguments",
    "config_from_args",
    "load_config",
    "to_environment",
    "ENV_PREFIX",
    "worker_id",
]

ENV_PREFIX = "STREAM_LEARNER_"
CLIENTS = ("kafka-python", "confluent")
# An output topic named after its input topic or group: <input>.predictions, <input>.dlq,
# <group>.models. "none" (or "off") turns an output off.
AUTO = "auto"
GUARANTEES = ("at-least-once", "exactly-once")
# What the worker does with a text over --max-text-bytes.
ON_OVERSIZE = ("dead-letter", "truncate")
# Past it a message (6x the text, for JSON escapes) would exceed what brokers accept by default
# many times over; decoding and featurizing are linear, but a record's memory is not bounded.
MAX_TEXT_BYTES_CEILING = 16 * 2**20


class ConfigError(ValueError):
    """A setting is missing or has a value that cannot be used."""


def _csv(value: str | Sequence[str]) -> tuple[str, ...]:
    """Comma-separated names (or a TOML list) → a tuple without blanks.

    >>> _csv(" nb, neural,,")
    ('nb', 'neural')
    """
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return tuple(item.strip() for item in items if item.strip())


def _bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _optional_text(value) -> str | None:
    text = str(value).strip()
    return None if text.lower() in ("", "none", "off", "-") else text


def _optional_float(value) -> float | None:
    return None if _optional_text(value) is None else float(value)


def _optional_int(value) -> int | None:
    return None if _optional_text(value) is None else int(value)


_BYTE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30}


def _byte_size(value: str | int) -> int:
    """Bytes, with an optional unit.

    >>> _byte_size("256MiB"), _byte_size("1.5 GB"), _byte_size(4096)
    (268435456, 1500000000, 4096)
    """
    if isinstance(value, int):
        return value
    text = str(value).strip().lower()
    number = text.rstrip("kmgib ")
    unit = text[len(number):].strip()
    if unit not in _BYTE_UNITS or not number:
        raise ValueError(f"not a size in bytes: {value!r} (e.g. 268435456, 256MiB, 1GB)")
    return int(float(number) * _BYTE_UNITS[unit])


@dataclasses.dataclass(frozen=True)
class _Option:
    name: str
    kind: Callable[[Any], Any]
    help: str
    secret: bool = False  # never logged, never a flag: environment, TOML or a *_file option


_OPTIONS: tuple[_Option, ...] = (
    _Option("bootstrap_servers", str, "Kafka bootstrap servers, host:port[,host:port]"),
    _Option("topics", _csv, "input topic(s), comma-separated"),
    _Option("labels_topic", _optional_text, "topic of late label-only records (default: the input topics)"),
    _Option("group_id", str, "Kafka consumer group"),
    _Option("create_topics", _bool, "create missing input topics (one partition each) instead of refusing to start"),
    _Option("text_field", str, "JSON field of the messages holding the text"),
    _Option("max_text_bytes", _byte_size, "longest text, in UTF-8 bytes (KiB/MiB allowed); at most 16 MiB; a message may take 6 times that plus 64 KiB (JSON escapes), a longer one is dead-lettered (message_too_large)"),
    _Option("on_oversize", str, "a text over --max-text-bytes: dead-letter (text_too_long) | truncate (learn from and predict on its first --max-text-bytes, counted in stream_learner_truncated_texts_total)"),
    _Option("label_field", str, "JSON field holding the label"),
    _Option("id_field", str, "JSON field holding the record id (joins late labels, keys the outputs)"),
    _Option("ts_field", str, "JSON field holding the event time"),
    _Option("learners", _csv, "learners to run side by side, comma-separated registry names"),
    _Option("serving", str, "which learner answers: leader | ensemble | fixed:NAME"),
    _Option("drift_detector", str, "adwin | page-hinkley | kswin | ddm | eddm | hddm-a | hddm-w | none"),
    _Option("drift_reaction", str, "alert | reset | background"),
    _Option("window", int, "rolling-accuracy window, records"),
    _Option("label_buffer_size", int, "most predicted records kept waiting for a late label"),
    _Option("label_buffer_bytes", _byte_size, "most bytes the records waiting for a late label take (their features kept as arrays; KiB/MiB/GiB allowed); the oldest are evicted"),
    _Option("label_ttl", _optional_float, "seconds a record waits for its label (none: forever)"),
    _Option("max_classes", int, "most classes the learners learn; a record with a label past them is dead-lettered (too_many_classes)"),
    _Option("seed", int, "random seed of the learners"),
    _Option("processing_guarantee", str, "at-least-once | exactly-once: with exactly-once, each cycle's predictions, dead letters, drift events and consumed offsets are written in one Kafka transaction, with a checkpoint that agrees with it"),
    _Option("transaction_every_records", _optional_int, "exactly-once: end the transaction (and checkpoint) after this many records (default: --checkpoint-every-records)"),
    _Option("transaction_every_seconds", _optional_float, "exactly-once: end the transaction (and checkpoint) after this many seconds; outputs become visible to read_committed readers then (default: --checkpoint-every-seconds)"),
    _Option("transaction_timeout", float, "exactly-once: seconds a transaction's commit or abort may take; past it the worker exits non-zero and its restart recovers (a fenced or frozen broker may never answer)"),
    _Option("checkpoint_dir", Path, "checkpoint directory (one per worker)"),
    _Option("checkpoint_every_records", int, "checkpoint after this many records"),
    _Option("checkpoint_every_seconds", float, "checkpoint after this many seconds"),
    _Option("checkpoint_keep", int, "how many checkpoints to keep"),
    _Option("checkpoint_key_file", _optional_text, "file holding the group secret that checkpoint (and fusion) keys derive from (else $STREAM_LEARNER_CHECKPOINT_KEY, else $XDG_CONFIG_HOME/stream-learner/checkpoint.key)"),
    _Option("generate_key", _bool, "create a random secret if none is configured: in --checkpoint-key-file if given, else in $XDG_CONFIG_HOME/stream-learner/checkpoint.key (mode 0600)"),
    _Option("allow_fresh_start", _bool, "start with empty learners when the checkpoint directory held checkpoints but none is valid (without it the worker refuses to start)"),
    _Option("predictions_topic", _optional_text, "predictions topic (default auto: <input>.predictions; none: off)"),
    _Option("dead_letter_topic", _optional_text, "dead-letter topic (default auto: <input>.dlq; none: off)"),
    _Option("drift_topic", _optional_text, "drift-events topic (default: off)"),
    _Option("producer_process", _bool, "run the output producer in a child process (a second core for Kafka I/O)"),
    _Option("client", str, "Kafka client library: kafka-python | confluent (librdkafka, pip install 'stream-learner[confluent]')"),
    _Option("consumer_process", _bool, "run the kafka-python consumer in a child process (a second core for Kafka I/O)"),
    _Option("worker_id", _optional_text, "stable name of this worker in its group (default: host name; --processes adds -0, -1, ...)"),
    _Option("processes", int, "worker processes to start on this machine, each with its own checkpoint sub-directory"),
    _Option("fusion", _optional_text, "share learners with the group's other workers through the models topic: off | on | LEARNER=average|counts|ensemble|none,..."),
    _Option("models_topic", _optional_text, "compacted topic of learner snapshots (default auto: <group>.models)"),
    _Option("fusion_every_seconds", float, "publish what was learned since and fold in the peers' this often"),
    _Option("fusion_every_records", _optional_int, "also publish and fold after this many records (none: by time only)"),
    _Option("fusion_full_every_seconds", float, "publish full snapshots (whole models, all counts) this often"),
    _Option("fusion_max_age", _optional_float, "ignore a peer's averaged/ensembled snapshot older than this many seconds (none: never)"),
    _Option("fusion_peer_ttl", _optional_float, "forget a peer (free its models) that has published nothing for this many seconds; longer than --fusion-full-every-seconds (none: never)"),
    _Option("max_poll_records", int, "most records per poll (one batch)"),
    _Option("max_event_time_skew", _optional_float, "pause a partition whose records run this many seconds of event time ahead of the owned partition furthest behind, so a backlog is learned in time order (none: off)"),
    _Option("mini_batch", int, "predict, then learn, this many records at a time (numpy learners learn them in one step; 0: one record at a time)"),
    _Option("poll_timeout", float, "seconds one poll waits for records"),
    _Option("session_timeout_ms", int, "consumer-group session timeout, ms"),
    _Option("auto_offset_reset", str, "where a new group starts: earliest | latest"),
    _Option("metrics_port", _optional_int, "port of /metrics, /healthz, /readyz (0: a free port; none: off)"),
    _Option("metrics_host", str, "address of the metrics endpoint"),
    _Option("stop_when_idle", _optional_float, "exit after this many seconds without records (default: run forever)"),
    _Option("shutdown_timeout", float, "seconds allowed from the stop signal to the exit: the batch, the checkpoint (its flush included) and closing the clients"),
    _Option("broker_timeout", float, "seconds without an answer from the broker (fetch, group heartbeat, commit) after which /readyz reports not ready and the loss is logged"),
    _Option("broker_liveness_timeout", _optional_float, "seconds without an answer from the broker after which /healthz also fails, so an orchestrator restarts the worker (none: never; waiting for the broker is alive)"),
    _Option("client_id", str, "Kafka client id"),
    _Option("security_protocol", str, "PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL"),
    _Option("sasl_mechanism", _optional_text, "PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512 | OAUTHBEARER | GSSAPI"),
    _Option("sasl_plain_username", _optional_text, "SASL username"),
    _Option("sasl_plain_password", _optional_text, "SASL password (never logged; environment or TOML only, a flag is refused)", secret=True),
    _Option("sasl_plain_password_file", _optional_text, "file holding the SASL password"),
    _Option("ssl_cafile", _optional_text, "CA bundle for the brokers' certificates"),
    _Option("ssl_certfile", _optional_text, "client certificate (PEM)"),
    _Option("ssl_keyfile", _optional_text, "client private key (PEM)"),
    _Option("ssl_password", _optional_text, "password of the client key (never logged; environment or TOML only, a flag is refused)", secret=True),
    _Option("ssl_password_file", _optional_text, "file holding the password of the client key"),
    _Option("ssl_check_hostname", _bool, "verify the broker host name against its certificate"),
)


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """Everything ``stream-learner run`` needs. Build it with :func:`load_config`."""

    topics: tuple[str, ...]
    bootstrap_servers: str = "127.0.0.1:9092"
    labels_topic: str | None = None
    group_id: str = "stream-learner"
    create_topics: bool = False
    text_field: str = "text"
    max_text_bytes: int = 64 * 1024
    on_oversize: str = "dead-letter"
    label_field: str = "label"
    id_field: str = "id"
    ts_field: str = "ts"
    learners: tuple[str, ...] = ("neural",)  # the best on the dev streams: README "Defaults"
    serving: str = "leader"
    drift_detector: str = "adwin"
    drift_reaction: str = "alert"
    window: int = 1000
    label_buffer_size: int = 100_000
    label_buffer_bytes: int = 256 * 2**20
    label_ttl: float | None = 3600.0
    max_classes: int = 500
    seed: int = 0
    processing_guarantee: str = "at-least-once"
    transaction_every_records: int | None = None  # None: checkpoint_every_records
    transaction_every_seconds: float | None = None  # None: checkpoint_every_seconds
    transaction_timeout: float = 60.0
    checkpoint_dir: Path = Path("checkpoints")
    # A 2^18-bucket numpy model pickles to ~70 MB: checkpoint by time, with a record cap.
    checkpoint_every_records: int = 100_000
    checkpoint_every_seconds: float = 30.0
    checkpoint_keep: int = 3
    checkpoint_key_file: str | None = None
    generate_key: bool = False
    allow_fresh_start: bool = False
    predictions_topic: str | None = AUTO  # None: no predictions are written
    dead_letter_topic: str | None = AUTO
    drift_topic: str | None = None
    producer_process: bool = True
    client: str = "kafka-python"
    consumer_process: bool = False
    worker_id: str | None = None
    processes: int = 1
    fusion: str | None = None
    models_topic: str | None = AUTO
    fusion_every_seconds: float = 5.0
    fusion_every_records: int | None = None
    fusion_full_every_seconds: float = 60.0
    fusion_max_age: float | None = 600.0
    fusion_peer_ttl: float | None = 600.0
    max_poll_records: int = 500
    mini_batch: int = 0
    max_event_time_skew: float | None = None
    poll_timeout: float = 1.0
    session_timeout_ms: int = 10_000
    auto_offset_reset: str = "earliest"
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    stop_when_idle: float | None = None
    shutdown_timeout: float = 30.0
    broker_timeout: float = 30.0
    broker_liveness_timeout: float | None = None
    client_id: str = "stream-learner"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = dataclasses.field(default=None, repr=False)
    sasl_plain_password_file: str | None = dataclasses.field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = dataclasses.field(default=None, repr=False)
    ssl_password_file: str | None = dataclasses.field(default=None, repr=False)
    ssl_check_hostname: bool = True

    def __post_init__(self):
        if not self.topics:
            raise ConfigError("no input topic: give --topic (or STREAM_LEARNER_TOPICS)")
        if not self.learners:
            raise ConfigError("no learner: give --learners")
        first = self.topics[0]
        # Resolve the output defaults here so every reader sees the same names.
        if self.predictions_topic == AUTO:
            object.__setattr__(self, "predictions_topic", f"{first}.predictions")
        if self.dead_letter_topic == AUTO:
            object.__setattr__(self, "dead_letter_topic", f"{first}.dlq")
        if self.models_topic == AUTO:
            object.__setattr__(self, "models_topic", f"{self.group_id}.models")
        if self.client not in CLIENTS:
            raise ConfigError(f"client must be one of {', '.join(CLIENTS)}, not {self.client!r}")
        from stream_learner.fusion.rules import FusionError, parse_rules

        try:
            parse_rules(self.fusion)
        except FusionError as error:
            raise ConfigError(str(error)) from None
        if self.fusion_every_seconds <= 0 or self.fusion_full_every_seconds <= 0:
            raise ConfigError("fusion_every_seconds and fusion_full_every_seconds must be positive")
        for name in ("checkpoint_every_records", "checkpoint_keep", "max_poll_records", "window", "processes", "label_buffer_size", "label_buffer_bytes", "max_classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.fusion_peer_ttl is not None and self.fusion_peer_ttl <= max(self.fusion_every_seconds, self.fusion_full_every_seconds):
            # A peer publishing only full snapshots (``average``) is heard from that rarely.
            raise ConfigError("fusion_peer_ttl must be longer than fusion_every_seconds and fusion_full_every_seconds (or none)")
        if self.fusion_every_records is not None and self.fusion_every_records < 1:
            raise ConfigError("fusion_every_records must be at least 1 (or none)")
        if self.max_event_time_skew is not None and (self.max_event_time_skew < 0 or self.consumer_process):
            raise ConfigError("max_event_time_skew must be 0 or more, and cannot be used with consumer_process")
        if self.mini_batch < 0:
            raise ConfigError("mini_batch must be 0 (off) or more")
        if self.checkpoint_every_seconds <= 0 or self.poll_timeout <= 0:
            raise ConfigError("checkpoint_every_seconds and poll_timeout must be positive")
        if self.shutdown_timeout <= 0 or self.broker_timeout <= 0:
            raise ConfigError("shutdown_timeout and broker_timeout must be positive")
        if self.broker_liveness_timeout is not None and self.broker_liveness_timeout < self.broker_timeout:
            raise ConfigError("broker_liveness_timeout must be at least broker_timeout (or none)")
        if self.auto_offset_reset not in ("earliest", "latest"):
            raise ConfigError("auto_offset_reset must be earliest or latest")
        self._check_processing_guarantee()
        if self.on_oversize not in ON_OVERSIZE:
            raise ConfigError(f"on_oversize must be one of {', '.join(ON_OVERSIZE)}, not {self.on_oversize!r}")
        if not 1 <= self.max_text_bytes <= MAX_TEXT_BYTES_CEILING:
            raise ConfigError(f"max_text_bytes must be from 1 to {MAX_TEXT_BYTES_CEILING} (16 MiB), not {self.max_text_bytes}")
        outputs = {self.predictions_topic, self.dead_letter_topic, self.drift_topic} - {None}
        if outputs & set(self.input_topics):
            raise ConfigError("an output topic is also an input topic: the worker would read its own output")

    def _check_processing_guarantee(self) -> None:
        if self.processing_guarantee not in GUARANTEES:
            raise ConfigError(f"processing_guarantee must be one of {', '.join(GUARANTEES)}, not {self.processing_guarantee!r}")
        if self.transaction_timeout <= 0:
            raise ConfigError("transaction_timeout must be positive")
        if self.transaction_every_records is not None and self.transaction_every_records < 1:
            raise ConfigError("transaction_every_records must be at least 1 (or none)")
        if self.transaction_every_seconds is not None and self.transaction_every_seconds <= 0:
            raise ConfigError("transaction_every_seconds must be positive (or none)")
        if not self.exactly_once:
            return
        # The transaction's producer needs the consumer's group metadata, at each commit.
        if self.consumer_process:
            raise ConfigError("exactly-once needs the consumer in the worker's process: leave --consumer-process off")
        if self.fusion_rules is not None:
            raise ConfigError("exactly-once does not support --fusion yet: snapshots are written outside the transactions")

    @property
    def exactly_once(self) -> bool:
        return self.processing_guarantee == "exactly-once"

    @property
    def cycle_records(self) -> int:
        """Records per cycle (checkpoint, and in exactly-once mode transaction)."""
        if self.exactly_once and self.transaction_every_records is not None:
            return self.transaction_every_records
        return self.checkpoint_every_records

    @property
    def cycle_seconds(self) -> float:
        if self.exactly_once and self.transaction_every_seconds is not None:
            return self.transaction_every_seconds
        return self.checkpoint_every_seconds

    @property
    def fusion_rules(self) -> dict[str, str] | None:
        """None when fusion is off, else ``{learner: rule}`` overrides."""
        from stream_learner.fusion.rules import parse_rules

        return parse_rules(self.fusion)

    def decoder(self):
        """The message decoder with this configuration's field names."""
        from stream_learner.core.records import Decoder

        return Decoder(
            id_field=self.id_field,
            text_field=self.text_field,
            label_field=self.label_field,
            ts_field=self.ts_field,
            max_text_bytes=self.max_text_bytes,
            oversize="truncate" if self.on_oversize == "truncate" else "error",
        )

    @property
    def input_topics(self) -> tuple[str, ...]:
        if self.labels_topic and self.labels_topic not in self.topics:
            return (*self.topics, self.labels_topic)
        return self.topics

    def client_options(self) -> dict[str, Any]:
        """Security and identity settings passed through to every kafka-python client."""
        options: dict[str, Any] = {
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            # Give up a bootstrap attempt after 5 s (the worker retries with its own backoff
            # and a clear log line) and reconnect within 5 s once a lost broker is back.
            "bootstrap_timeout_ms": 5000,
            "reconnect_backoff_max_ms": 5000,
        }
        for name in (
            "sasl_mechanism",
            "sasl_plain_username",
            "sasl_plain_password",
            "ssl_cafile",
            "ssl_certfile",
            "ssl_keyfile",
            "ssl_password",
        ):
            value = getattr(self, name)
            if value is not None:
                options[name] = value
        if self.security_protocol.upper().endswith("SSL"):
            options["ssl_check_hostname"] = self.ssl_check_hostname
        return options

    def describe(self) -> dict[str, Any]:
        """Settings safe to log or export as labels: secrets are masked."""
        described = {}
        for option in _OPTIONS:
            value = getattr(self, option.name)
            if option.secret and value is not None:
                value = "***"
            described[option.name] = ",".join(value) if isinstance(value, tuple) else value
        return described


def env_name(option_name: str) -> str:
    return ENV_PREFIX + option_name.upper()


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every setting; defaults are None so unset flags fall back to env / file."""
    defaults = {field.name: field.default for field in dataclasses.fields(WorkerConfig)}
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help=f"TOML file with settings (env {ENV_PREFIX}CONFIG)",
    )
    group = parser.add_argument_group("settings (flag > environment > TOML file > default)")
    for option in _OPTIONS:
        flag = "--" + option.name.replace("_", "-")
        names = ["--topic", flag] if option.name == "topics" else [flag]
        default = defaults.get(option.name)
        if default is dataclasses.MISSING:
            shown = "; required"
        elif "(default" in option.help:  # the help says it in its own words
            shown = ""
        elif default is None and "none: off" in option.help:
            shown = "; default off"
        else:
            shown = f"; default {_show(default)}"
        switch = {"nargs": "?", "const": "true"} if option.kind is _bool else {}  # --flag alone: true
        group.add_argument(
            *names,
            dest=option.name,
            default=None,
            **switch,
            metavar="BOOL" if option.kind is _bool else option.name.split("_")[-1].upper(),
            help=f"{option.help} (env {env_name(option.name)}{shown})".replace("%", "%%"),
        )


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    if value is None:
        return "not set"
    return str(value)


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Settings from a TOML file; tables are flattened, so ``[kafka] group_id = "g"`` works.

    A setting given twice (in two tables, at the top level and in a table, or as ``topic``
    and ``topics``) is an error naming both places: one would silently win.
    """
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    flat: dict[str, Any] = {}
    places: dict[str, str] = {}  # setting -> the dotted key that gave it

    def walk(table: Mapping[str, Any], prefix: str) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
                continue
            name = key.replace("-", "_")
            name = "topics" if name == "topic" else name
            if name in places:
                raise ConfigError(
                    f"{path}: {name} is set twice, as {places[name]} and as {prefix}{key}; keep one"
                )
            flat[name], places[name] = value, prefix + key

    walk(data, "")
    known = {option.name for option in _OPTIONS}
    unknown = sorted(places[name] for name in set(flat) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) in {path}: {', '.join(unknown)}")
    return flat


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> WorkerConfig:
    """Resolve every setting: flag, else environment, else TOML file, else default."""
    environ = os.environ if environ is None else environ
    config_file = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    from_file = read_toml(config_file) if config_file else {}
    values: dict[str, Any] = {}
    for option in _OPTIONS:
        flag_value = getattr(args, option.name, None)
        if flag_value is not None and option.secret:
            flag = "--" + option.name.replace("_", "-")
            raise ConfigError(
                f"{flag} is refused: a command line is visible to every user (ps); set "
                f"${env_name(option.name)} or give {flag}-file (or {option.name} in the --config file)"
            )
        if flag_value is not None:
            raw, where = flag_value, "--" + option.name.replace("_", "-")
        elif environ.get(env_name(option.name)) is not None:
            raw, where = environ[env_name(option.name)], env_name(option.name)
        elif option.name in from_file:
            raw, where = from_file[option.name], f"{config_file}: {option.name}"
        else:
            continue
        try:
            values[option.name] = option.kind(raw)
        except (TypeError, ValueError) as error:
            shown = "***" if option.secret else repr(raw)
            raise ConfigError(f"{where}: bad value {shown}: {error}") from None
    if "topics" not in values:
        raise ConfigError("no input topic: give --topic (or STREAM_LEARNER_TOPICS, or topics in the config file)")
    for name in ("sasl_plain_password", "ssl_password"):
        values.update(_password_from_file(name, values))
    return WorkerConfig(**values)


def _password_from_file(name: str, values: Mapping[str, Any]) -> dict[str, str]:
    """``{name: password}`` read from ``<name>_file`` when that is given (trailing newline dropped)."""
    path = values.get(f"{name}_file")
    if path is None:
        return {}
    if values.get(name) is not None:
        raise ConfigError(f"give the {name.replace('_', ' ')} once: ${env_name(name)} or --{name.replace('_', '-')}-file, not both")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--{name.replace('_', '-')}-file: cannot read {path}: {error}") from None
    return {name: text.rstrip("\r\n")}


def to_environment(config: WorkerConfig) -> dict[str, str]:
    """Every setting of ``config`` as ``STREAM_LEARNER_*`` variables, secrets included: how
    ``--processes`` hands settings to its workers (never on a command line, which ``ps`` shows).

    >>> config = load_config(["--topic", "a,b", "--label-ttl", "none", "--producer-process", "false"], environ={})
    >>> config_from_args(argparse.Namespace(), environ=to_environment(config)) == config
    True
    """
    environ = {}
    for option in _OPTIONS:
        if option.name in ("sasl_plain_password_file", "ssl_password_file"):
            continue  # already read: the password itself is handed over
        value = getattr(config, option.name)
        if value is None:
            if option.secret:
                continue
            text = "none"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, tuple):
            text = ",".join(value)
        else:
            text = str(value)
        environ[env_name(option.name)] = text
    return environ


def load_config(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> WorkerConfig:
    """Parse ``argv`` (the settings flags only) into a :class:`WorkerConfig`."""
    parser = argparse.ArgumentParser(add_help=False)
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)), environ)


def worker_id(config: WorkerConfig) -> str:
    """This worker's name in its group: ``--worker-id``, else the host name (stable in a
    Kubernetes StatefulSet)."""
    import socket

    return config.worker_id or socket.gethostname()
