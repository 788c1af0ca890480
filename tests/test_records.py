"""Decoding: every input becomes a Record or a DecodeError with a reason — nothing else."""

import json
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_learner.core.records import DecodeError, Decoder, Reason, Record

decoder = Decoder()


def reason_of(raw, decoder=decoder):
    with pytest.raises(DecodeError) as caught:
        decoder.decode(raw)
    assert caught.value.raw == (raw.encode() if isinstance(raw, str) else bytes(raw or b""))
    return caught.value.reason


def test_full_json_record():
    record = decoder.decode(
        b'{"id": "m1", "text": "hello there", "label": "pos", "ts": "2024-01-02T03:04:05Z"}'
    )
    assert record == Record("m1", "hello there", "pos", 1704164645.0)


def test_plain_text_is_a_text_only_record():
    assert decoder.decode("caf\u00e9 au lait".encode()) == Record(None, "café au lait")


def test_bracketed_plain_text_is_text_but_a_json_array_is_not():
    assert decoder.decode(b"[URGENT] call me").text == "[URGENT] call me"
    assert reason_of(b'["a", "b"]') == Reason.NOT_AN_OBJECT


def test_label_only_record():
    record = decoder.decode(b'{"id": 7, "label": 1}')
    assert record.is_label_only and record.id == "7" and record.label == 1


def test_numeric_timestamps_in_seconds_and_milliseconds():
    assert decoder.decode(b'{"text": "a", "ts": 1700000000}').ts == 1700000000.0
    assert decoder.decode(b'{"text": "a", "ts": 1700000000123}').ts == pytest.approx(1700000000.123)


def test_configurable_field_names():
    custom = Decoder(id_field="key", text_field="body", label_field="y", ts_field="time")
    record = custom.decode(b'{"key": "k", "body": "words", "y": "spam", "time": 5}')
    assert record == Record("k", "words", "spam", 5.0)


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"\xff\xfe not utf-8", Reason.INVALID_UTF8),
        (b'{"text": "unterminated', Reason.INVALID_JSON),
        (b"[1, 2, 3]", Reason.NOT_AN_OBJECT),
        (b"", Reason.EMPTY_MESSAGE),
        (b"   \n", Reason.EMPTY_MESSAGE),
        (b'{"id": "a"}', Reason.MISSING_TEXT),
        (b'{"text": "   "}', Reason.EMPTY_TEXT),
        (b'{"text": 42}', Reason.TEXT_NOT_STRING),
        (b'{"text": "a", "label": [1]}', Reason.INVALID_LABEL),
        (b'{"text": "a", "label": 1.5}', Reason.INVALID_LABEL),
        (b'{"text": "a", "id": {"x": 1}}', Reason.INVALID_ID),
        (b'{"text": "a", "ts": true}', Reason.INVALID_TIMESTAMP),
        (b'{"text": "a", "ts": [1]}', Reason.INVALID_TIMESTAMP),
        (b'{"label": "spam"}', Reason.LABEL_WITHOUT_ID),
        (b'{"text": "\\ud800"}', Reason.INVALID_UTF8),
    ],
)
def test_bad_messages_have_a_reason_and_keep_their_bytes(raw, reason):
    assert reason_of(raw) == reason


def test_text_size_limit():
    small = Decoder(max_text_bytes=10)
    assert small.decode(b'{"text": "0123456789"}').text == "0123456789"
    assert reason_of(b'{"text": "0123456789A"}', small) == Reason.TEXT_TOO_LONG
    # The limit counts UTF-8 bytes, not characters.
    assert reason_of('{"text": "ééééééé"}'.encode(), small) == Reason.TEXT_TOO_LONG


def test_a_text_over_the_limit_is_cut_at_a_character_boundary_when_asked():
    cutting = Decoder(max_text_bytes=10, oversize="truncate")
    record = cutting.decode('{"id": "a", "text": "ééééééé", "label": "x"}'.encode())
    assert (record.text, record.truncated_from, record.id, record.label) == ("ééééé", 14, "a", "x")
    assert cutting.decode(b"0123456789").truncated_from is None  # at the limit: whole
    assert cutting.decode(b"0123456789AB").text == "0123456789"  # plain text too
    # Nothing but blanks before the cut: no text to learn from, so the error stands.
    assert reason_of(b'{"text": "           x"}', cutting) == Reason.TEXT_TOO_LONG
    assert cutting.decode(json.dumps({"text": "a" * 200}).encode()).truncated_from == 200
    # The message limit still holds.
    assert reason_of(json.dumps({"text": "a" * 70_000}).encode(), cutting) == Reason.MESSAGE_TOO_LARGE
    with pytest.raises(ValueError, match="oversize"):
        Decoder(oversize="shorten")


@settings(max_examples=300, deadline=None)
@given(text=st.text(min_size=1, max_size=200), limit=st.integers(1, 120))
def test_truncation_keeps_a_prefix_within_the_limit(text, limit):
    raw = json.dumps({"text": text}).encode()
    try:
        whole = Decoder(max_text_bytes=10**6).decode(raw)
    except DecodeError:
        return  # refused for another reason (blank text, a lone surrogate)
    try:
        record = Decoder(max_text_bytes=limit, oversize="truncate").decode(raw)
    except DecodeError as error:
        assert error.reason == Reason.TEXT_TOO_LONG  # the kept prefix has no content
        return
    size = len(whole.text.encode("utf-8"))
    assert len(record.text.encode("utf-8")) <= limit
    assert whole.text.startswith(record.text)
    assert record.truncated_from == (size if size > limit else None)


def test_default_limit_is_64_kib():
    assert Decoder().decode(json.dumps({"text": "a" * 65536}).encode()).text
    assert reason_of(json.dumps({"text": "a" * 65537}).encode()) == Reason.TEXT_TOO_LONG


def test_none_value_is_a_tombstone():
    assert reason_of(None) == Reason.EMPTY_MESSAGE


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_fail_with_a_reason(raw):
    try:
        record = decoder.decode(raw)
    except DecodeError as error:
        assert isinstance(error.reason, Reason)
        assert error.raw == raw
    else:
        assert record.text is None or record.text.strip()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


@given(
    st.dictionaries(
        st.sampled_from(["id", "text", "label", "ts", "other"]), json_values, max_size=5
    )
)
def test_any_json_object_decodes_or_fails_with_a_reason(obj):
    raw = json.dumps(obj).encode()
    try:
        record = decoder.decode(raw)
    except DecodeError as error:
        assert isinstance(error.reason, Reason) and error.raw == raw
    else:
        assert record.text is None or record.text == obj["text"]
        if record.text is None:
            assert record.label is not None and record.id is not None


no_surrogates = st.characters(blacklist_categories=("Cs",))


def has_content(text: str) -> bool:
    return any(unicodedata.category(c) not in ("Zs", "Zl", "Zp", "Cc", "Cf") for c in text)


@given(
    st.text(no_surrogates, min_size=1, max_size=50).filter(has_content),
    st.one_of(st.none(), st.text(no_surrogates, min_size=1, max_size=10), st.integers(-1000, 1000)),
    st.one_of(st.none(), st.text(no_surrogates, min_size=1, max_size=10)),
)
def test_encode_decode_round_trip(text, label, record_id):
    record = Record(record_id, text, label, 1234.5)
    assert decoder.decode(decoder.encode(record)) == record


# --- quiet losses: byte-order marks, deep nesting, texts without content ------------------------

BOM = b"\xef\xbb\xbf"


@given(
    st.text(no_surrogates, min_size=1, max_size=30).filter(has_content),
    st.one_of(st.none(), st.text(no_surrogates, min_size=1, max_size=10)),
    st.one_of(st.none(), st.text(no_surrogates, min_size=1, max_size=10)),
)
def test_a_byte_order_mark_before_json_is_dropped(text, label, record_id):
    raw = decoder.encode(Record(record_id, text, label))
    assert decoder.decode(BOM + raw) == decoder.decode(raw)
    assert decoder.decode(BOM + b"  " + raw) == decoder.decode(raw)
    assert decoder.decode(BOM + b"plain words").text == "plain words"
    assert reason_of(BOM) == Reason.EMPTY_TEXT


def test_a_closed_array_20000_deep_is_invalid_json_not_text():
    assert reason_of(b"[" * 20000 + b"]" * 20000) == Reason.INVALID_JSON
    assert reason_of(b'{"text": "x", "a": ' + b"[" * 20000 + b"]" * 20000 + b"}") == (
        Reason.INVALID_JSON
    )
    # Brackets inside strings do not nest; an unclosed run of "[" is no JSON: text.
    assert decoder.decode(json.dumps({"text": "[" * 20000}).encode()).text == "[" * 20000
    assert decoder.decode(b"[" * 20000 + b" help").text.endswith("help")
    strict = Decoder(allow_plain_text=False)
    assert reason_of(b"[" * 20000 + b" help", strict) == Reason.INVALID_JSON


def _nested(depth: int, shape: list[str]) -> str:
    opening = "".join("[" if shape[i % len(shape)] == "[" else '{"k": ' for i in range(depth))
    closing = "".join("]" if shape[i % len(shape)] == "[" else "}" for i in reversed(range(depth)))
    return opening + "1" + closing


@given(
    st.integers(1, 400),
    st.lists(st.sampled_from(["[", "{"]), min_size=1, max_size=4),
    st.booleans(),
)
def test_json_nested_too_deep_is_invalid_json_whatever_its_shape(depth, shape, in_a_record):
    limited = Decoder(max_json_depth=100)
    value = _nested(depth, shape)
    raw = (f'{{"text": "t", "meta": {value}}}' if in_a_record else value).encode()
    deepest = depth + in_a_record
    if deepest > 100:
        assert reason_of(raw, limited) == Reason.INVALID_JSON
    elif in_a_record:
        assert limited.decode(raw).text == "t"
    else:  # an array or an object without text: refused as before
        assert reason_of(raw, limited) in (Reason.NOT_AN_OBJECT, Reason.MISSING_TEXT)


_NO_CONTENT = st.text(
    st.sampled_from(["\x00", "\x01", "\x1f", "\x7f", "\x85", "\u200b", "\u200e", "\u2066",
                     "\ufeff", "\u00ad", " ", "\t", "\n", "\u3000", "\u2028", "\xa0"]),
    min_size=1,
    max_size=40,
)  # fmt: skip


@given(_NO_CONTENT)
def test_a_text_of_control_format_and_space_characters_is_empty(text):
    assert reason_of(json.dumps({"text": text}).encode()) == Reason.EMPTY_TEXT
    if text.encode().strip():  # a blank message is empty_message
        assert reason_of(text.encode()) == Reason.EMPTY_TEXT
    # One character of content is enough.
    assert decoder.decode(json.dumps({"text": text + "a" + text}).encode()).text
    assert decoder.decode(json.dumps({"text": text + "\u0301"}).encode()).text
