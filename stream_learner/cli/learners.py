"""``stream-learner learners``: what the registry offers."""

from __future__ import annotations

from stream_learner.cli.evaluate import DEFAULT_LEARNERS
from stream_learner.core.drift import DETECTORS, REACTIONS
from stream_learner.core.processor import SERVING_POLICIES
from stream_learner.learners.registry import available_learners


def add_learners_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "learners",
        help="list learners, drift detectors, reactions and serving policies",
        description="List the registered learners with a line on each, and the names the "
        "drift-detector, drift-reaction and serving options take.",
    )
    parser.set_defaults(func=_run)


def _run(args) -> int:
    specs = available_learners()
    width = max(len(name) for name in specs)
    print("learners (use with --learners; or module:factory for your own River pipeline):")
    for name, spec in specs.items():
        print(f"  {name.ljust(width)}  {spec.description}")
    print(f"default (evaluate and run without --learners): {', '.join(DEFAULT_LEARNERS)}")
    print(f"drift detectors: {', '.join([*DETECTORS, 'none'])}")
    print(f"drift reactions: {', '.join(REACTIONS)}")
    print(f"serving policies: {', '.join(SERVING_POLICIES)}")
    return 0
