"""Any learner of a processor as a state dict: our own as data, River's pickled.

The numpy learner (bare, or behind a :class:`~stream_learner.core.features.TextFeaturizer`)
becomes its :meth:`~stream_learner.learners.neural.model.NeuralClassifier.state_dict` and the
featurizer's parameters: plain data that no class path appears in. A River learner has no
public state schema: it is pickled, and read back through the restricted unpickler
(:mod:`stream_learner.state.unpickle`), which loads only estimator classes and maps moved ones.

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
    """``model`` as a state dict: ``kind`` ``"neural"`` (data) or ``"pickle"`` (River's)."""
    from stream_learner.learners.neural.model import NeuralClassifier

    featurizer, head = None, model
    if isinstance(model, compose.Pipeline):
        steps = list(model.steps.values())
        if len(steps) == 2 and type(steps[0]) is TextFeaturizer:
            featurizer, head = steps
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
        "data": pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL),
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
        return restricted_loads(state["data"], trusted_modules=trusted_modules)
    if kind != "neural":
        raise StateError(f"unknown learner kind {kind!r} in a learner state")
    learner = NeuralClassifier.from_state(state["learner"])
    if state["featurizer"] is None:
        return learner
    try:
        featurizer = TextFeaturizer(**state["featurizer"])
    except (TypeError, ValueError) as error:
        raise StateError(f"featurizer parameters do not fit: {error}") from None
    return compose.Pipeline(featurizer, learner)


def featurizer_params(featurizer: TextFeaturizer) -> dict:
    """The featurizer's parameters (its whole configuration: it learns nothing)."""
    return featurizer._get_params()
