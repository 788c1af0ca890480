"""Long texts: transform_one counts repeated chunks, tokens and word pairs once, and NFKC meets
the characters it expands most already expanded. Both are shortcuts: features, their order and
their weights are those of the plain path (``Counter(buckets(text))``), which these tests take
as the reference."""

from __future__ import annotations

import collections
import contextlib
import re
import sys
import time
import unicodedata

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stream_learner.core import features
from stream_learner.core.features import (
    _COUNT_FROM,
    _LONG_MARK_RUN,
    _MENTION,
    _NFKC_EXPANSIONS,
    TextFeaturizer,
    _nfkc_casefold,
)
from stream_learner.data.adversarial import PIECES

CONFIGS = [
    {},  # the neural learners'
    {"norm": "l2"},  # the linear learners'
    {"word_ngrams": 1, "normalize": "urls"},  # naive Bayes'
    {"n_buckets": 256, "word_ngrams": 1, "punctuation": False, "binary": True, "dense": True},
    {"n_buckets": 1000, "normalize": False, "seed": 7, "segment_unspaced": False},
]


@contextlib.contextmanager
def _plain_path():
    """No shortcut: every text is short to the featurizer, and NFKC meets no table."""
    saved = features._COUNT_FROM, features._EXPAND_AHEAD_FROM
    features._COUNT_FROM = features._EXPAND_AHEAD_FROM = sys.maxsize
    try:
        yield
    finally:
        features._COUNT_FROM, features._EXPAND_AHEAD_FROM = saved


def reference(featurizer: TextFeaturizer, text: str) -> list:
    """What transform_one gave before the shortcuts, as (bucket, weight) pairs in order."""
    with _plain_path():
        counts = collections.Counter(featurizer.clone().buckets(text))
    if featurizer.binary:
        x = dict.fromkeys(counts, 1)
    elif featurizer.norm == "l2" and counts:
        scale = sum(v * v for v in counts.values()) ** -0.5
        x = {k: v * scale for k, v in counts.items()}
    else:
        x = dict(counts)
    if featurizer.dense:
        x = {**dict.fromkeys(range(featurizer.n_buckets), 0), **x}
    return list(x.items())


_WORDS = st.sampled_from(
    [
        "the", "movie", "was", "GOOD", "don't", "it's!", ":)", "@bob", "a@b.co", "http://x.org/a,",
        "3.14", "Straße", "中国人", "ที่นี่", "한국어", "e\u0301", "\ufdfa", "\ufdfb", "\u247d",
        "\u3300", "x\ufdfa", "\ufdfa\u0301", "\x00\x00", "''a", "@a", "a@",
    ]
)  # fmt: skip
_SEPARATORS = st.sampled_from(["", " ", "  ", "\n", ", "])
# Units repeated many times (hostile) and words seldom repeated (ordinary), mixed.
_RUN = st.tuples(
    st.one_of(_WORDS, st.sampled_from(PIECES), st.text(max_size=6)),
    _SEPARATORS,
    st.integers(1, 400),
)


def _long_text(runs) -> str:
    text = "".join((unit + separator) * count for unit, separator, count in runs)
    return text if len(text) >= _COUNT_FROM else text + " ordinary words" * (_COUNT_FROM // 10)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs=st.lists(_RUN, min_size=1, max_size=6))
@example(runs=[("\ufdfa", "", 2000)])  # NFKC-expanded chunks, repeated
@example(runs=[("\ufdfa", "", 1000), ("ordinary text of many words ", "", 40), ("@a", "", 500)])
@example(runs=[("@a", "", 2000)])  # many tokens per character, one chunk
@example(runs=[("ß", "", 1200)])  # expanded by case folding, one chunk
@example(runs=[("a ", "", 900), ("b c", " ", 300)])  # many short chunks
@example(runs=[("\ufdfa", " \x00\x00 ", 300)])  # the batch separator: the batch's per-text path
def test_long_texts_give_the_features_of_the_plain_path_in_its_order(config, runs):
    text = _long_text(runs)
    featurizer = TextFeaturizer(**config)
    assert list(featurizer.transform_one(text).items()) == reference(TextFeaturizer(**config), text)
    if not featurizer.dense:
        batch = TextFeaturizer(**config).buckets_many([text, "short one", text])
        assert batch.record(0) == batch.record(2) == dict(reference(featurizer, text))


def test_ordinary_long_texts_keep_their_features(fetched_dataset):
    from stream_learner.data.readers import load_records

    text = "\n".join(r.text for r in load_records(fetched_dataset("vader"))[:600])
    assert len(text) > 10 * _COUNT_FROM
    for config in CONFIGS:
        featurizer = TextFeaturizer(**config)
        assert list(featurizer.transform_one(text).items()) == reference(featurizer, text)


# NFKC and the expanding characters' table


def _plain_nfkc_casefold(text: str) -> str:
    """What ``_nfkc_casefold`` does without the table: runs of marks cut to 30, NFKC."""
    text = _LONG_MARK_RUN.sub(r"\1", text)
    return unicodedata.normalize("NFKC", text).casefold()


@pytest.mark.slow
def test_the_table_holds_the_longest_expansions_and_only_those_nfkc_maps_alone():
    assert len(_NFKC_EXPANSIONS[0xFDFA]) == 18 and 0xFDFB in _NFKC_EXPANSIONS
    # Neighbours that compose with or are reordered against what an expansion starts or ends
    # with: marks (classes 230, 220), a mark of class 0 that composes, Hangul jamo (L, V, T)
    # and syllables, Arabic letters and marks, Latin letters, and the table's own characters.
    neighbours = [
        "", "a", " ", "\u0301", "\u0316", "\u0cd5", "\u0b3e", "\u1100", "\u1161", "\u11a8",
        "\uac00", "\u0627", "\u0653", "\u0644", "\u0654", "ß", "\u3099", "\u30ab", *map(chr, _NFKC_EXPANSIONS),
    ]  # fmt: skip
    for code, form in _NFKC_EXPANSIONS.items():
        assert len(form) >= 4 and form == unicodedata.normalize("NFKC", chr(code))
        for before in neighbours:
            for after in neighbours:
                text = before + chr(code) + after
                assert unicodedata.normalize("NFKC", text) == unicodedata.normalize(
                    "NFKC", before + form + after
                ), (hex(code), before, after)


def test_no_canonical_pair_and_no_long_form_lies_beyond_the_scanned_planes():
    # The table is built from the code points below U+20000.
    for code in range(0x20000, 0x110000):
        mapping = unicodedata.decomposition(chr(code))
        if mapping:
            assert mapping[0] != "<" or len(unicodedata.normalize("NFKC", chr(code))) < 4, hex(code)
            assert mapping[0] == "<" or " " not in mapping, hex(code)


_NFKC_ALPHABET = (
    "".join(map(chr, _NFKC_EXPANSIONS))
    + "a \u0301\u0316\u1100\u1161\u11a8\u0627\u0653ßİ中\U0001d165"
)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=_NFKC_ALPHABET, max_size=40), st.integers(1, 30))
def test_nfkc_with_the_table_is_nfkc(text, times):
    text = (text * times)[:600] if text else text
    assert _nfkc_casefold(text) == _plain_nfkc_casefold(text)


@settings(max_examples=500)
@given(st.text(alphabet="@a_.1é -+\n中", max_size=40))
def test_mentions_are_found_as_the_reference_pattern_finds_them(text):
    reference_pattern = re.compile(r"(?<![\w@])@\w++")
    assert _MENTION.sub(" __user__ ", text) == reference_pattern.sub(" __user__ ", text)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_expanding_characters_featurize_fast_at_the_text_limit(config):
    # 64 KiB of the characters NFKC expands most: about 87,000 words after NFKC. A guard of
    # seconds (ordinary text of that size: tens of milliseconds) catches only a blow-up.
    text = ("\ufdfa\ufdfb\ufdfa\u3300\ufdfa\u247d" * 4000)[: 64 * 1024 // 3]
    featurizer = TextFeaturizer(**config)
    start = time.perf_counter()
    x = featurizer.transform_one(text)
    assert time.perf_counter() - start < 5.0
    assert list(x.items()) == reference(TextFeaturizer(**config), text)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    unit=st.sampled_from(["@a", "a@b.", "a@b.c ", "1 ", "1.", "x http://a.b ", "@a中", "a@b.c+"]),
    count=st.integers(200, 3000),
    tail=st.sampled_from(["", " words at the end", " 中文", " don't @bob 42"]),
)
def test_texts_made_of_placeholders_give_the_features_of_the_plain_path(config, unit, count, tail):
    # Normalizations that replace most of a text tokenize its repeated chunks once.
    text = _long_text([(unit, "", count)]) + tail
    assert list(TextFeaturizer(**config).transform_one(text).items()) == reference(
        TextFeaturizer(**config), text
    )
    if not config.get("dense"):
        batch = TextFeaturizer(**config).buckets_many([text])
        assert batch.record(0) == dict(reference(TextFeaturizer(**config), text))
