"""The JSON Schemas of the messages: the committed copies are current, the decoder never
accepts what the input schema refuses, and everything the worker writes validates."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_learner.cli.main import main
from stream_learner.core.processor import StreamProcessor
from stream_learner.core.records import DecodeError, Decoder
from stream_learner.io.schemas import SCHEMAS, input_schema
from stream_learner.io.sinks import MemorySink, Outputs
from stream_learner.io.sources import MemorySource
from stream_learner.runtime.worker import Worker

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schemas"


def validator(schema):
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_the_committed_schemas_are_what_the_command_prints(name, capsys):
    assert main(["schema", name]) == 0
    printed = json.loads(capsys.readouterr().out)
    validator(printed)
    committed = json.loads((SCHEMA_DIR / f"{name}.json").read_text())
    assert printed == committed, f"regenerate: stream-learner schema {name} > docs/schemas/{name}.json"


def test_the_input_schema_follows_the_field_options(capsys):
    assert main(["schema", "input", "--text-field", "body", "--label-field", "y"]) == 0
    schema = validator(json.loads(capsys.readouterr().out))
    assert schema.is_valid({"body": "hello", "y": "pos"})
    assert not schema.is_valid({"text": "hello"})


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(["", " ", "\t\n", "2024-01-02T03:04:05Z", "x" * 300, "\u00a0", "ok"]),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6
)
candidate_objects = st.fixed_dictionaries(
    {},
    optional={"id": json_values, "text": json_values, "label": json_values, "ts": json_values, "other": json_values},
)


@pytest.mark.slow
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(candidate_objects)
def test_what_the_decoder_accepts_validates_and_what_does_not_validate_is_refused(obj):
    schema = validator(input_schema())
    raw = json.dumps(obj).encode("utf-8")
    try:
        Decoder().decode(raw)
    except DecodeError:
        accepted = False
    else:
        accepted = True
    if accepted:
        assert schema.is_valid(obj), list(schema.iter_errors(obj))
    if not schema.is_valid(obj):
        assert not accepted


messages = st.one_of(
    st.builds(
        lambda i, text, label: {"id": f"r{i}", "text": text, "label": label},
        st.integers(0, 50),
        st.text(min_size=1, max_size=30).filter(str.strip),
        st.sampled_from(["pos", "neg", 1, 2, True, None]),
    ),
    st.builds(lambda i, label: {"id": f"r{i}", "label": label}, st.integers(0, 50), st.sampled_from(["pos", 3])),
    st.sampled_from([{"text": ""}, {"text": 5}, [1, 2], "plain words"]),
)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages, min_size=1, max_size=40))
def test_every_message_the_worker_writes_validates(values):
    sink = MemorySink()
    outputs = Outputs(sink, predictions_topic="in.predictions", dead_letter_topic="in.dlq", drift_topic="in.drift")
    worker = Worker(StreamProcessor(["nb", "neural"], serving="ensemble"), outputs, None)
    raw = [v.encode() if isinstance(v, str) else json.dumps(v).encode() for v in values]
    source = MemorySource({("in", 0): raw})
    worker.source = source
    while batch := source.poll(0):
        worker.process_batch(batch)
    prediction, dead_letter = validator(SCHEMAS["prediction"]()), validator(SCHEMAS["dead-letter"]())
    for _key, value, _headers in sink.on("in.predictions"):
        message = json.loads(value)
        assert prediction.is_valid(message), list(prediction.iter_errors(message))
    for _key, _value, headers in sink.on("in.dlq"):
        as_object = {name: data.decode("utf-8") for name, data in headers}
        assert dead_letter.is_valid(as_object), list(dead_letter.iter_errors(as_object))
    assert len(sink.on("in.predictions")) + len(sink.on("in.dlq")) >= sum(
        1 for v in values if not (isinstance(v, dict) and "text" not in v and v.get("label") is not None)
    )
