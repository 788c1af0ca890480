"""The ``stream-learner`` command line.

Each subcommand lives in the module that does the work; this file only wires them up. A
module adds its subcommand with a ``add_<name>_parser(subparsers)`` function that sets
``func`` on its parser; ``func(args) -> int`` is the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# (module, function) pairs: imported lazily so `stream-learner --help` stays fast and a
# subcommand's heavy imports (matplotlib, kafka) cost only when it runs.
_SUBCOMMANDS: list[tuple[str, str]] = [
    ("stream_learner.cli.evaluate", "add_evaluate_parser"),
    ("stream_learner.data.datasets", "add_datasets_parser"),
    ("stream_learner.learners.pretrained", "add_models_parser"),
    ("stream_learner.cli.learners", "add_learners_parser"),
    ("stream_learner.runtime.worker", "add_run_parser"),
    ("stream_learner.io.broker", "add_broker_parser"),
    ("stream_learner.cli.produce", "add_produce_parser"),
    ("stream_learner.cli.demo", "add_demo_parser"),
    ("stream_learner.io.schemas", "add_schema_parser"),
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stream-learner")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-learner",
        description="Online learning on text streams: learn one record at a time, "
        "from files or Kafka, with drift detection and Prometheus metrics.",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("STREAM_LEARNER_LOG_LEVEL", "INFO"),
        help="logging level (env STREAM_LEARNER_LOG_LEVEL; default %(default)s)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, function_name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue  # subcommand not built yet
            raise
        getattr(module, function_name)(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
