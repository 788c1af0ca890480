"""Any learner of a processor as a state dict: our own as data, River's pickled.

A learner behind a :class:`~stream_learner.core.features.TextFeaturizer` is kept as the
featurizer's parameters (the featurizer learns nothing) and the classifier's state. The numpy
classifier's state is its
:meth:`~stream_learner.learners.neural.model.NeuralClassifier.state_dict`: plain data that no
class path appears in. A River classifier has no public state schema: it is pickled, and read
back through the restricted unpickler (:mod:`stream_learner.state.unpickle`), which loads only
estimator classes and maps moved ones.

>>> from stream_learner.learners.registry import make_learner
>>> model = make_learner("neural", n_buckets=2**8)
>>> model.learn_one("cheap pills", "spam")
>>> state = learner_state(model)
>>> state["schema"], state["kind"], state["featurizer"]["n_buckets"]
('stream-learner/learner', 'neural', 256)
>>> learner_from_state(state).predict_proba_one("pills") == model.predict_proba_one("pills")
True
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable

from river import compose

from stream_learner.core.features import TextFeaturizer
from stream_learner.state.schema import StateError, check_schema

__all__ = ["SCHEMA", "VERSION", "learner_state", "learner_from_state"]

SCHEMA = "stream-learner/learner"
VERSION = 1


def learner_state(model) -> dict:
    """``model`` as a state dict: ``kind`` ``"neural"`` (data) or ``"pickle"`` (River's). A
    ``TextFeaturizer | classifier`` pipeline is kept as the featurizer's parameters and the
    classifier's state."""
    from stream_learner.learners.neural.model import NeuralClassifier

    featurizer, head = None, model
    if isinstance(model, compose.Pipeline):
        steps = list(model.steps.values())
        if len(steps) > 1 and type(steps[0]) is TextFeaturizer:
            featurizer = steps[0]
            head = steps[1] if len(steps) == 2 else compose.Pipeline(*steps[1:])
    # River counts a pipeline as an instance of its last step's class: exclude pipelines.
    if type(head) is NeuralClassifier:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "kind": "neural",
            "featurizer": featurizer_params(featurizer) if featurizer is not None else None,
            "learner": head.state_dict(),
        }
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "kind": "pickle",
        "featurizer": featurizer_params(featurizer) if featurizer is not None else None,
        "data": pickle.dumps(head, protocol=pickle.HIGHEST_PROTOCOL),
    }


def learner_from_state(state: dict, *, trusted_modules: Iterable[str] = ()):
    """The learner :func:`learner_state` described. A pickled one is read through the restricted
    unpickler (``trusted_modules``: modules of ``module:factory`` learners whose classes it may
    hold). Raises :class:`~stream_learner.state.schema.StateError`, or
    :class:`~stream_learner.state.unpickle.UnpicklingRefused` for a pickle of anything else."""
    from stream_learner.learners.neural.model import NeuralClassifier
    from stream_learner.state.unpickle import restricted_loads

    check_schema(state, SCHEMA, (VERSION,))
    kind = state.get("kind")
    if kind == "pickle":
        learner = restricted_loads(state["data"], trusted_modules=trusted_modules)
    elif kind == "neural":
        learner = NeuralClassifier.from_state(state["learner"])
    else:
        raise StateError(f"unknown learner kind {kind!r} in a learner state")
    if state["featurizer"] is None:
        return learner
    try:
        featurizer = TextFeaturizer(**state["featurizer"])
    except (TypeError, ValueError) as error:
        raise StateError(f"featurizer parameters do not fit: {error}") from None
    if isinstance(learner, compose.Pipeline):  # the steps after the featurizer
        return compose.Pipeline(featurizer, *learner.steps.values())
    return compose.Pipeline(featurizer, learner)


def featurizer_params(featurizer: TextFeaturizer) -> dict:
    """The featurizer's parameters (its whole configuration: it learns nothing)."""
    return featurizer._get_params()
