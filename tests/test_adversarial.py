"""No text makes the featurizer slow: adversarial texts through every registered learner's
featurizer, under a guard of seconds that only a blow-up (quadratic backtracking, say) breaks.
Speed figures are in benchmarks/adversarial.py."""

from __future__ import annotations

import json
import time
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_learner.core.features import TextFeaturizer
from stream_learner.data.adversarial import ENDINGS, PIECES, worst_cases
from stream_learner.learners.registry import LearnerError, available_learners, make_learner

# Per text of 60 kB an ordinary text takes tens of milliseconds; the quadratic e-mail pattern
# took ~10 s there and ~45 s at 128 kB, where a linear featurizer needs well under a second.
GUARD_SECONDS = 5.0


def _registered_featurizers() -> dict[str, TextFeaturizer]:
    """One featurizer per distinct configuration among the registered learners."""
    featurizers: dict[str, TextFeaturizer] = {}
    seen = []
    for name in available_learners():
        try:
            model = make_learner(name, n_buckets=2**12)
        except LearnerError:  # needs a fetched model; its featurizer is another learner's
            continue
        featurizer = next(iter(model.steps.values()))
        assert isinstance(featurizer, TextFeaturizer), name
        params = featurizer._get_params()
        if params not in seen:
            seen.append(params)
            featurizers[name] = featurizer
    return featurizers


FEATURIZERS = _registered_featurizers()


def _featurize_under_guard(featurizer: TextFeaturizer, text: str, guard: float = GUARD_SECONDS):
    start = time.perf_counter()
    x = featurizer.transform_one(text)
    took = time.perf_counter() - start
    assert took < guard, f"{took:.1f} s for {len(text)} characters"
    return x


def test_every_registered_tokenization_is_covered():
    # naive Bayes' word counts, the linear and neural learners' n-grams (raw and L2-scaled),
    # the tree's dense buckets
    assert len(FEATURIZERS) >= 4


@pytest.mark.parametrize("name", sorted(FEATURIZERS))
def test_the_worst_cases_found_featurize_in_linear_time(name):
    featurizer = FEATURIZERS[name]
    cases = worst_cases(128 * 1024)  # twice the decoder's text limit: quadratic shows
    for case, text in cases.items():
        x = _featurize_under_guard(featurizer, text)
        assert all(0 <= k < (featurizer.n_buckets) for k in x), case
    start = time.perf_counter()
    if not featurizer.dense:  # the batch path, as the worker's mini-batches take it
        batch = featurizer.buckets_many(list(worst_cases(60_000).values()))
        assert len(batch) == len(cases)
        assert time.perf_counter() - start < GUARD_SECONDS * 4


_RUN = st.tuples(st.sampled_from(PIECES), st.integers(1, 12_000), st.sampled_from(ENDINGS))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs=st.lists(_RUN, min_size=1, max_size=3), name=st.sampled_from(sorted(FEATURIZERS)))
def test_long_runs_with_near_miss_endings_featurize_in_linear_time(runs, name):
    text = "".join(piece * count + ending for piece, count, ending in runs)
    _featurize_under_guard(FEATURIZERS[name], text)


def test_the_e_mail_normalization_is_unchanged_but_linear():
    featurizer = TextFeaturizer()
    assert featurizer.tokens("mail a.b+c@d-e.fg.hi, or x@y") == [
        "mail", "__email__", ",", "or", "x", "@", "y",
    ]  # fmt: skip
    # After an address the next one may start inside the same run of e-mail characters.
    assert featurizer.tokens("a@b.c+x@d.e") == ["__email__", "__email__"]
    assert _featurize_under_guard(featurizer, "a" * 200_000 + " @b")


@settings(max_examples=300)
@given(st.text(alphabet="ab1_.+-@ é中\n", max_size=30))
def test_e_mails_are_found_as_the_reference_pattern_finds_them(text):
    import re

    from stream_learner.core.features import _replace_emails

    reference = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")  # quadratic: short texts only
    assert _replace_emails(text) == reference.sub(" __email__ ", text)


def test_long_runs_of_combining_marks_are_cut_before_nfkc():
    featurizer = TextFeaturizer()
    zalgo = "a" + "\u0301" * 40 + " b"
    assert featurizer.tokens(zalgo) == featurizer.tokens("a" + "\u0301" * 30 + " b")
    assert featurizer.tokens("e\u0301 x") == ["é", "x"]  # short runs compose as before
    _featurize_under_guard(featurizer, "a" + "\u0301\u0316" * 100_000)
    # Marks beyond the BMP (musical symbols: combining classes 216 and 1), alone and mixed.
    stem, flag = "\U0001d165", "\U0001d167"
    assert featurizer.tokens("a" + stem * 40) == featurizer.tokens("a" + stem * 30)
    _featurize_under_guard(featurizer, "a" + (stem + flag) * 50_000)
    _featurize_under_guard(featurizer, "a" + ("\u0301" + flag) * 50_000)


def test_every_character_that_decomposes_into_marks_counts_as_one():
    from stream_learner.core.features import _DECOMPOSE_INTO_MARKS

    def into_marks(char: str) -> bool:
        return unicodedata.combining(unicodedata.normalize("NFKD", char)[0]) != 0

    found = [
        c
        for c in range(0x110000)
        if not 0xD800 <= c <= 0xDFFF and not unicodedata.combining(chr(c)) and into_marks(chr(c))
    ]
    assert sorted(found) == sorted(_DECOMPOSE_INTO_MARKS)
    featurizer = TextFeaturizer()
    for code in _DECOMPOSE_INTO_MARKS:
        _featurize_under_guard(featurizer, "a" + chr(code) * 200_000)


@pytest.mark.parametrize("mini_batch", [0, 16])
def test_the_corpus_through_the_decoder_and_evaluate(mini_batch):
    from stream_learner.cli.evaluate import evaluate
    from stream_learner.core.processor import StreamProcessor
    from stream_learner.core.records import DecodeError, Decoder

    decoder = Decoder()
    records, refused = [], {}
    start = time.perf_counter()
    for i, (name, text) in enumerate(worst_cases(60_000).items()):
        for raw in (json.dumps({"id": name, "text": text, "label": "abc"[i % 3]}), text):
            try:
                record = decoder.decode(raw.encode("utf-8", "surrogatepass"))
            except DecodeError as error:
                refused[name] = error.reason
            else:
                if record.label is not None:
                    records.append(record)
    assert time.perf_counter() - start < GUARD_SECONDS * 4
    assert refused == {"batch_separator": "empty_text"}  # only NULs and spaces: no content
    result = evaluate(records, StreamProcessor(["nb", "neural"]), mini_batch=mini_batch)
    assert result.records == len(records) == len(worst_cases(60_000)) - 1
    assert result.learner_errors == 0
