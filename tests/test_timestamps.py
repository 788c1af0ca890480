"""The timestamp parser: the formats real files use, and nothing but ValueError otherwise."""

import datetime as dt
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_learner.core.records import Decoder, parse_timestamp

# From 1974: a millisecond count of an earlier moment is below 1e11 and reads as seconds.
moments = st.datetimes(
    min_value=dt.datetime(1974, 1, 1),
    max_value=dt.datetime(2999, 12, 31),
    timezones=st.just(dt.UTC),
)


def _styles(moment: dt.datetime):
    """(text, expected seconds) in every format the parser accepts."""
    whole = moment.replace(microsecond=0)
    minute = whole.replace(second=0)
    y, m, d, h, mi, s = whole.year, whole.month, whole.day, whole.hour, whole.minute, whole.second
    yield moment.isoformat(), moment.timestamp()
    yield moment.isoformat().replace("+00:00", "Z"), moment.timestamp()
    yield moment.replace(tzinfo=None).isoformat(sep=" "), moment.timestamp()
    yield f"{y:04d}-{m:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}", whole.timestamp()
    yield f"{y:04d}/{m:02d}/{d:02d} {h:02d}:{mi:02d}:{s:02d}", whole.timestamp()
    yield f"{y:04d}/{m}/{d} {h}:{mi:02d}", minute.timestamp()
    yield f"{y:04d}/{m}/{d} {h}:{mi:02d}:{s}", whole.timestamp()
    yield f"{y:04d}/{m}/{d}", whole.replace(hour=0, minute=0, second=0).timestamp()
    yield f"{y:04d}-{m:02d}-{d:02d}", whole.replace(hour=0, minute=0, second=0).timestamp()
    yield f"{whole.timestamp():.0f}", whole.timestamp()
    yield str(int(whole.timestamp()) * 1000), whole.timestamp()


@given(moments, st.sampled_from(["", " ", "\t", "\n "]), st.sampled_from(["", " ", "\r\n"]))
def test_every_accepted_format_gives_the_moment(moment, before, after):
    for text, expected in _styles(moment):
        assert math.isclose(parse_timestamp(before + text + after), expected, abs_tol=1e-6), text


@given(moments, st.integers(-23, 23), st.sampled_from([0, 30, 45]))
def test_offsets_shift_the_moment(moment, hours, minutes):
    offset = dt.timedelta(hours=hours, minutes=math.copysign(minutes, hours or 1))
    local = moment.astimezone(dt.timezone(offset))
    text = local.replace(tzinfo=None).isoformat(sep=" ")
    sign = "-" if offset < dt.timedelta(0) else "+"
    total = abs(int(offset.total_seconds())) // 60
    zone = f"{sign}{total // 60:02d}:{total % 60:02d}"
    assert math.isclose(parse_timestamp(text + zone), moment.timestamp(), abs_tol=1e-6)
    assert math.isclose(
        parse_timestamp(text + zone.replace(":", "")), moment.timestamp(), abs_tol=1e-6
    )


@given(st.integers(0, 10**11) | st.floats(0, 1e11, allow_nan=False))
def test_numbers_are_epoch_seconds_and_large_ones_milliseconds(seconds):
    assert parse_timestamp(seconds) == float(seconds)
    if seconds > 1e8:  # a millisecond count above the threshold
        assert math.isclose(parse_timestamp(seconds * 1000), float(seconds), rel_tol=1e-12)


@given(st.text(max_size=40) | st.floats() | st.integers())
def test_anything_else_is_a_value_error(value):
    try:
        ts = parse_timestamp(value)
    except ValueError:
        return
    assert math.isfinite(ts)


@pytest.mark.parametrize(
    "text",
    ["yesterday", "", "   ", "2016-13-01", "2016/02/30 7:11", "2016-12-30 25:00", "nan", "1e400"],
)
def test_impossible_timestamps_are_refused(text):
    with pytest.raises(ValueError):
        parse_timestamp(text)


@given(st.text(max_size=40))
def test_the_decoder_drops_a_timestamp_it_cannot_read_and_keeps_the_record(ts):
    record = Decoder().decode(json.dumps({"id": "a", "text": "words", "label": "x", "ts": ts}))
    assert (record.text, record.label) == ("words", "x")
    assert (record.ts is None) == (record.ts_error is not None)


def test_the_decoder_can_still_refuse_unreadable_timestamps():
    from stream_learner.core.records import DecodeError, Reason

    with pytest.raises(DecodeError) as caught:
        Decoder(invalid_timestamps="error").decode(
            b'{"text": "a", "ts": "2016/12/30 7:11 yesterday"}'
        )
    assert caught.value.reason == Reason.INVALID_TIMESTAMP
    record = Decoder().decode(b'{"text": "a", "ts": "2016/12/30 7:11"}')
    assert record.ts == 1483081860.0 and record.ts_error is None
