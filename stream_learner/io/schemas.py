"""JSON Schemas (draft 2020-12) of the messages stream-learner reads and writes.

Producers in any language can validate what they send against :func:`input_schema`, and
consumers of the outputs against :func:`prediction_schema`, :func:`dead_letter_schema` and
:func:`drift_event_schema`. ``stream-learner schema NAME`` prints one; the committed copies in
``docs/schemas/`` are checked against these functions by the tests.

The input schema is a little looser than the decoder where JSON Schema cannot say what the
decoder checks (a text's size in UTF-8 bytes, printable content): a message the decoder
accepts always validates, and a message that does not validate is always dead-lettered.

>>> schema = input_schema()
>>> [choice["type"] for choice in schema["properties"]["text"]["anyOf"]]
['string', 'null']
>>> sorted(SCHEMAS)
['dead-letter', 'drift', 'input', 'prediction']

"""

from __future__ import annotations

import argparse
import json
import sys

from stream_learner.core.records import Decoder, Reason

__all__ = [
    "SCHEMAS",
    "dead_letter_schema",
    "drift_event_schema",
    "input_schema",
    "prediction_schema",
    "add_schema_parser",
]

_DRAFT = "https://json-schema.org/draft/2020-12/schema"
_BASE = "https://stream-learner.invalid/schemas/"
_LABEL = {
    "description": "A class: a string, an integer or a boolean.",
    "anyOf": [
        {"type": "string", "minLength": 1, "maxLength": 256},
        {"type": "integer", "minimum": -(2**63) + 1, "maximum": 2**63 - 1},
        {"type": "boolean"},
    ],
}
_SOURCE = {
    "description": "Where the input message was read.",
    "type": "object",
    "properties": {
        "topic": {"type": "string"},
        "partition": {"type": "integer", "minimum": 0},
        "offset": {"type": "integer", "minimum": 0},
    },
    "required": ["topic", "partition", "offset"],
}


def input_schema(decoder: Decoder | None = None) -> dict:
    """An input message: a record with text, or a late label for an earlier record.

    The field names follow ``decoder`` (``--text-field`` and the others). A message that is
    not a JSON object is read as plain text; this schema describes the JSON form.
    """
    decoder = decoder or Decoder()
    text, label, record_id, ts = (
        decoder.text_field,
        decoder.label_field,
        decoder.id_field,
        decoder.ts_field,
    )
    return {
        "$schema": _DRAFT,
        "$id": _BASE + "input.json",
        "title": "stream-learner input record",
        "description": (
            f"A JSON object with a {text!r} to predict and learn from, or a label-only record "
            f"({record_id!r} and {label!r} without {text!r}) that labels an earlier record. "
            f"Other fields are ignored. The whole message is at most "
            f"{decoder.max_message_bytes} bytes, the text at most {decoder.max_text_bytes} "
            "bytes of UTF-8 (the worker's --max-text-bytes; with --on-oversize truncate a longer "
            "text is cut to it) with at least one printable character."
        ),
        "type": "object",
        "properties": {
            text: {
                "description": "The text; null or absent in a label-only record.",
                "anyOf": [{"type": "string", "minLength": 1, "pattern": r"\S"}, {"type": "null"}],
            },
            record_id: {
                "description": "Joins a late label to its record and keys the outputs.",
                "anyOf": [
                    {"type": "string", "minLength": 1, "maxLength": 1024},
                    {"type": "integer"},
                    {"type": "null"},
                ],
            },
            label: {"anyOf": [_LABEL, {"type": "null"}]},
            ts: {
                "description": (
                    "Event time: seconds or milliseconds since the epoch, or a date-time "
                    "string such as ISO-8601."
                ),
                "anyOf": [
                    {"type": "number", "minimum": -1e14, "maximum": 1e14},
                    {"type": "string"},
                    {"type": "null"},
                ],
            },
        },
        "anyOf": [
            {"required": [text], "properties": {text: {"type": "string"}}},
            {
                "description": "A label-only record.",
                "required": [record_id, label],
                "properties": {
                    text: {"type": "null"},
                    record_id: {"not": {"type": "null"}},
                    label: {"not": {"type": "null"}},
                },
            },
        ],
    }


def prediction_schema() -> dict:
    """A message of the predictions topic (key: the record id)."""
    return {
        "$schema": _DRAFT,
        "$id": _BASE + "prediction.json",
        "title": "stream-learner prediction",
        "description": (
            "The served prediction for one input record, written before the record is learned. "
            "Before any class has been learned, label is null and proba is empty."
        ),
        "type": "object",
        "properties": {
            "id": {
                "type": "string",
                "description": "The record id; for a record without one, the message key or "
                "topic/partition/offset.",
            },
            "label": {"anyOf": [_LABEL, {"type": "null"}]},
            "proba": {
                "description": "Probability of each known class, keyed by the class as a string.",
                "type": "object",
                "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "learner": {"type": "string", "description": "The learner (or ensemble) that served."},
            "model_version": {
                "type": "integer",
                "minimum": 0,
                "description": "Records learned so far by the worker's learners.",
            },
            "latency_ms": {"type": "number", "minimum": 0},
            "source": _SOURCE,
        },
        "required": ["id", "label", "proba", "learner", "model_version", "latency_ms", "source"],
        "additionalProperties": False,
    }


def dead_letter_schema() -> dict:
    """The headers of a dead-letter message, as an object of header name to its text."""
    reasons = sorted({reason.value for reason in Reason})
    return {
        "$schema": _DRAFT,
        "$id": _BASE + "dead-letter.json",
        "title": "stream-learner dead letter (headers)",
        "description": (
            "A dead letter's value is the input message's bytes, untouched (empty for a "
            "tombstone), and its key the input's key. Its Kafka headers, read as UTF-8 text "
            "into an object, follow this schema."
        ),
        "type": "object",
        "properties": {
            "reason": {"enum": reasons, "description": "Why the message was not learned."},
            "detail": {"type": "string", "maxLength": 1000},
            "source_topic": {"type": "string"},
            "source_partition": {"type": "string", "pattern": "^[0-9]+$"},
            "source_offset": {"type": "string", "pattern": "^[0-9]+$"},
        },
        "required": ["reason", "detail", "source_topic", "source_partition", "source_offset"],
    }


def drift_event_schema() -> dict:
    """A message of the drift topic (key: the learner)."""
    accuracy = {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "null"}]}
    return {
        "$schema": _DRAFT,
        "$id": _BASE + "drift.json",
        "title": "stream-learner drift event",
        "type": "object",
        "properties": {
            "learner": {"type": "string"},
            "detector": {"type": "string"},
            "position": {"type": "integer", "minimum": 0},
            "time": {"type": "number"},
            "accuracy_before": accuracy,
            "accuracy_after": accuracy,
            "source": _SOURCE,
        },
        "required": ["learner", "detector", "position", "time", "accuracy_before", "source"],
    }


SCHEMAS = {
    "input": input_schema,
    "prediction": prediction_schema,
    "dead-letter": dead_letter_schema,
    "drift": drift_event_schema,
}


def add_schema_parser(subparsers) -> None:
    from stream_learner.data.readers import add_field_arguments

    parser = subparsers.add_parser(
        "schema",
        help="print the JSON Schema of the input records or of an output topic's messages",
        description="Print a JSON Schema (draft 2020-12) to validate messages against: "
        "input (what producers send), prediction, dead-letter (its headers) or drift.",
    )
    parser.add_argument("name", choices=sorted(SCHEMAS), help="which messages")
    add_field_arguments(parser, what="of the input records (input only)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.name == "input":
        from stream_learner.data.readers import field_options

        schema = input_schema(Decoder(**field_options(args)))
    else:
        schema = SCHEMAS[args.name]()
    json.dump(schema, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0
