"""The prediction message: written directly for speed, the JSON of its fields (probabilities
to 6 decimals)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from stream_learner.core.processor import Prediction
from stream_learner.io.sinks import MemorySink, Outputs
from stream_learner.io.sources import Message

text = st.text(max_size=20)
labels = st.one_of(text, st.integers(), st.booleans(), st.none(), st.floats())
numbers = st.floats(allow_nan=True, allow_infinity=True)


def expected_bytes(record_id, prediction, model_version, latency_seconds, message):
    value = {
        "id": record_id,
        "label": prediction.label,
        "proba": {str(label): round(float(p), 6) for label, p in (prediction.proba or {}).items()},
        "learner": prediction.learner,
        "model_version": model_version,
        "latency_ms": round(latency_seconds * 1000.0, 3),
        "source": {"topic": message.topic, "partition": message.partition, "offset": message.offset},
    }
    return json.JSONEncoder(ensure_ascii=False, default=str).encode(value).encode("utf-8")


@given(
    record_id=text,
    label=labels,
    proba=st.dictionaries(labels, numbers, max_size=4) | st.none() | st.just({1: 0.25, "1": 0.75}),
    learner=text,
    model_version=st.integers(min_value=0),
    latency=st.floats(min_value=0, max_value=1e6),
    topic=text,
    partition=st.integers(min_value=0, max_value=10_000),
    offset=st.integers(min_value=0),
)
def test_prediction_messages_are_the_json_of_their_fields(
    record_id, label, proba, learner, model_version, latency, topic, partition, offset
):
    sink = MemorySink()
    outputs = Outputs(sink, predictions_topic="p", dead_letter_topic=None)
    message = Message(topic, partition, offset, None, b"x")
    prediction = Prediction(label, proba, learner)
    outputs.prediction(record_id, prediction, model_version=model_version, latency_seconds=latency, message=message)
    [(topic_sent, key, value, _headers)] = sink.sent
    assert (topic_sent, key) == ("p", record_id.encode("utf-8"))
    got, expected = parse(value), parse(expected_bytes(record_id, prediction, model_version, latency, message))
    assert got == expected
    # Keys, their order and everything outside the probabilities: byte for byte.
    assert list(got["proba"]) == list(expected["proba"])
    assert value.split(b', "proba": {')[0] == expected_bytes(record_id, prediction, model_version, latency, message).split(b', "proba": {')[0]


def parse(value: bytes):
    """JSON with NaN as a string, so that equal messages compare equal."""
    return json.loads(value, parse_constant=str)


@given(st.floats(min_value=0.0, max_value=1.0) | st.floats(min_value=-1e6, max_value=1e6))
def test_probabilities_are_written_as_round_to_6_decimals_gives(p):
    outputs = Outputs(MemorySink(), predictions_topic="p", dead_letter_topic=None)
    text = outputs._proba_json({"a": p, "b": 0.5})
    assert json.loads("{" + text + "}") == {"a": round(p, 6), "b": 0.5}
