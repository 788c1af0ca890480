"""The featurizer: normalization, n-grams, bounded buckets, and hashes stable across processes."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from stream_learner.core.features import _SEPARATOR, TextFeaturizer


def test_unicode_is_nfkc_normalized_and_casefolded():
    featurizer = TextFeaturizer()
    # Full-width letters (NFKC) and the German sharp s (casefold) meet their plain forms.
    assert featurizer.tokens("ＨＥＬＬＯ Straße") == featurizer.tokens("hello STRASSE")


def test_urls_emails_mentions_and_numbers_are_normalized():
    tokens = TextFeaturizer().tokens("see www.x.org or http://a.b/c?d=1 mail me@host.com @bob 3.14")
    assert tokens == [
        "see", "__url__", "__host_x_org__", "or", "__url__", "__host_a_b__",
        "mail", "__email__", "__user__", "__num__",
    ]  # fmt: skip
    assert TextFeaturizer(normalize=False).tokens("@bob 42") == ["@", "bob", "42"]


def test_hashes_do_not_change_between_releases():
    # Bucket ids are persisted in checkpoints and model files: this pins the scheme.
    x = TextFeaturizer(n_buckets=2**18).transform_one("stable hashing matters")
    assert sorted(x) == sorted(PINNED)


PINNED = [36199, 43913, 185228, 207997, 257338]


def test_word_bigrams_add_features_and_distinguish_order():
    unigrams = TextFeaturizer(word_ngrams=1)
    bigrams = TextFeaturizer(word_ngrams=2)
    assert unigrams.transform_one("not good") == unigrams.transform_one("good not")
    assert bigrams.transform_one("not good") != bigrams.transform_one("good not")
    assert sum(bigrams.transform_one("a b c").values()) == 3 + 2


def test_char_ngrams():
    featurizer = TextFeaturizer(word_ngrams=1, char_ngrams=(3, 3), punctuation=False)
    # "<ab>" has the 3-grams "<ab" and "ab>": one word feature + two character features.
    assert sum(featurizer.transform_one("ab").values()) == 3


def test_binary_and_l2_weights():
    assert set(TextFeaturizer(binary=True).transform_one("a a a b").values()) == {1}
    x = TextFeaturizer(norm="l2").transform_one("a a b c")
    assert abs(sum(v * v for v in x.values()) - 1.0) < 1e-9


def test_dict_input_with_on():
    featurizer = TextFeaturizer(on="body")
    assert featurizer.transform_one({"body": "hi there"}) == TextFeaturizer().transform_one(
        "hi there"
    )


def test_seed_changes_the_bucket_assignment():
    text = "the quick brown fox jumps over the lazy dog"
    assert TextFeaturizer(seed=0).transform_one(text) != TextFeaturizer(seed=1).transform_one(text)


def test_hash_cache_is_bounded_and_does_not_change_results():
    featurizer = TextFeaturizer(cache_size=16)
    fresh = TextFeaturizer(cache_size=10**6)
    for i in range(500):
        text = f"word{i} other{i * 7} shared"
        assert featurizer.transform_one(text) == fresh.transform_one(text)
        assert len(featurizer._hash_cache) <= 16


@settings(max_examples=200)
@given(st.text(max_size=200), st.sampled_from([2**4, 2**10, 1000, 2**18]))
def test_any_text_maps_into_the_buckets(text, n_buckets):
    featurizer = TextFeaturizer(n_buckets=n_buckets, char_ngrams=(2, 4))
    x = featurizer.transform_one(text)
    assert all(isinstance(k, int) and 0 <= k < n_buckets for k in x)
    assert all(v > 0 for v in x.values())


SAMPLE = [
    "Hello world, this is a test!",
    "Ünïcödé   text — with @mentions and http://links.example/path",
    "spam spam SPAM 100% free $$$",
    "日本語のテキスト",
    "我爱北京天安门 and Tokyo東京タワー, ภาษาไทยที่นี่ 한국어를 배워요 ភាសាខ្មែរ ကြည့် ພາສາລາວ",
]


def _buckets_in_subprocess(seed_env: str, config: dict) -> list:
    code = (
        "import json, sys; from stream_learner.core.features import TextFeaturizer;"
        "config, texts = json.loads(sys.stdin.read());"
        "f = TextFeaturizer(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()});"
        "print(json.dumps([sorted(f.transform_one(t).items()) for t in texts]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": seed_env}
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps([config, SAMPLE]),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize("config", [{"char_ngrams": (3, 5)}, {"word_ngrams": 1}], ids=str)
def test_bucket_ids_are_stable_across_processes(config):
    # Different PYTHONHASHSEEDs give different str hashes; our bucket ids must not change.
    first = _buckets_in_subprocess("1", config)
    second = _buckets_in_subprocess("2", config)
    here = [
        [list(p) for p in sorted(TextFeaturizer(**config).transform_one(t).items())] for t in SAMPLE
    ]
    assert first == second == here


@given(st.lists(st.text(max_size=40), min_size=1, max_size=5))
def test_same_text_same_features_whatever_came_before(texts):
    featurizer = TextFeaturizer(cache_size=4)
    for text in texts:
        featurizer.transform_one(text)
    assert featurizer.transform_one(texts[0]) == TextFeaturizer().transform_one(texts[0])


def test_normalize_a_subset_of_kinds():
    featurizer = TextFeaturizer(normalize="urls,numbers")
    assert featurizer.tokens("see http://a.io 42 @bob") == [
        "see", "__url__", "__host_a_io__", "__num__", "@", "bob",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown kinds"):
        TextFeaturizer(normalize="urls,hashtags").tokens("x")


# --- batches: buckets_many ------------------------------------------------------------------------

BATCH_CONFIGS = [
    {},
    {"n_buckets": 1000, "word_ngrams": 3, "seed": 7},
    {"word_ngrams": 1, "char_ngrams": (2, 4), "norm": "l2"},
    {"char_ngrams": (3, 5), "punctuation": False, "binary": True},
    {"normalize": False, "norm": "l2"},
    {"normalize": "urls,numbers", "word_ngrams": 0, "cache_size": 8},
    {"word_ngrams": 1, "punctuation": False, "normalize": "urls"},
    {"segment_unspaced": False},
]

# Pieces that exercise the tokenizer and the normalizations, mixed with arbitrary unicode.
_PIECES = st.sampled_from(
    [
        " ", "\t", "\n", "\x1c", "\xa0", "'", "’", "''", "don't", "it's!", "@bob", "@", "a@b.co",
        "http://x.org/a,", "www.y.com", "3.14", "42", "#tag", "(word", "word)", "!!!", ":)",
        "_", "__num__", "Straße", "ＨＥＬＬＯ", "İ", "q\u0303", "日本語", "\x00\x00", "\x00",
        "\ud800", "ǅ", "Σς", "x\u00a8y", "中国人", "東京タワーに", "ภาษาไทย", "ที่นี่", "한국어를",
        "ကြည့်", "ភាសាខ្មែរ", "ພາສາ", "か\u3099", "ー々〇", "๑๒", "abc中文def", "中's", "x'中",
    ]
)  # fmt: skip
_MIXED = st.lists(st.one_of(_PIECES, _PIECES, st.text(max_size=5)), max_size=12)
_TEXTS = st.one_of(st.text(max_size=60), _MIXED.map(" ".join), _MIXED.map("".join))


TRICKY = [
    "x @bob y", "a''b it's! 'quoted' don't dogs' ’tis", "#tag (word) word) !!! :) @", "mail a@b.co now",
    "see http://x.org/a, www.y.com 3.14 42 7-10 #1", "Straße ＨＥＬＬＯ İ Σς ǅ", "_ __num__ x_y",
    "q\u0303 x\u00a8y \ud800 \x00", "bob@ @@bob @bob. (@bob", "",
]  # fmt: skip


@pytest.mark.parametrize("config", BATCH_CONFIGS, ids=str)
@settings(max_examples=80, deadline=None)
@given(texts=st.lists(_TEXTS, max_size=8))
@example(texts=TRICKY)
@example(texts=[*TRICKY, "a \x00\x00 b"])  # the separator in a text: the per-text path
def test_a_batch_gives_each_text_what_transform_one_gives(config, texts):
    batched = TextFeaturizer(**config)
    single = TextFeaturizer(**config)
    for _ in range(2):  # the second pass reads the chunk caches the first filled
        batch = batched.buckets_many(texts)
        assert len(batch) == len(texts)
        assert batch.ids.dtype == np.int64 and batch.offsets[0] == 0 and batch.offsets[-1] == batch.ids.size
        for i, text in enumerate(texts):
            assert batch.record(i) == single.transform_one(text)
            start, end = batch.offsets[i], batch.offsets[i + 1]
            if batch.weights is None:  # the entries are the buckets, with repeats
                assert sorted(batch.ids[start:end].tolist()) == sorted(single.buckets(text))


def test_a_batch_handles_what_transform_one_handles():
    featurizer = TextFeaturizer(n_buckets=2**10)
    texts = ["Good good movie", None, "", "a \x00\x00 b", "ok"]  # the separator chunk, too
    batch = featurizer.buckets_many(texts)
    assert [batch.record(i) for i in range(len(texts))] == [featurizer.transform_one(t) for t in texts]
    assert len(featurizer.buckets_many([])) == 0
    on = TextFeaturizer(n_buckets=2**10, on="body")
    assert on.buckets_many([{"body": "hi there"}]).record(0) == featurizer.transform_one("hi there")
    with pytest.raises(ValueError, match="dense"):
        TextFeaturizer(n_buckets=16, dense=True).buckets_many(["a"])


def test_the_chunk_cache_stays_bounded_on_a_stream():
    featurizer = TextFeaturizer(cache_size=64)
    fresh = TextFeaturizer()
    for i in range(300):
        texts = [f"w{i}x{j} v{i}y{j}, z{i}!" for j in range(4)]  # every chunk new
        batch = featurizer.buckets_many(texts)
        assert [batch.record(j) for j in range(4)] == [fresh.transform_one(t) for t in texts]
        assert len(featurizer._chunk_caches[0]) <= 64


def test_pickled_featurizer_leaves_its_caches_behind_and_maps_alike():
    featurizer = TextFeaturizer(char_ngrams=(3, 4))
    texts = ["stable hashing matters", "again, stable"]
    before = featurizer.buckets_many(texts)
    copy = pickle.loads(pickle.dumps(featurizer))
    assert not hasattr(copy, "_chunk_caches")
    after = copy.buckets_many(texts)
    assert [after.record(i) for i in range(2)] == [before.record(i) for i in range(2)]
    assert sorted(before.record(0)) == sorted(TextFeaturizer(char_ngrams=(3, 4)).transform_one(texts[0]))


# --- scripts written without spaces ---------------------------------------------------------------


def test_scripts_without_spaces_become_letters_beside_the_words_of_spaced_scripts():
    featurizer = TextFeaturizer()
    assert featurizer.tokens("我爱Python和北京!") == ["我", "爱", "python", "和", "北", "京", "!"]
    # Kana and Han (NFKC composes か + voiced mark into が), Thai and Khmer letters keep their
    # combining marks, spaced Hangul is split into syllables, digits of any script stay numbers.
    assert featurizer.tokens("東京タワーか\u3099 ที่นี่ 한국어 ខ្មែរ ๑๒") == [
        "東", "京", "タ", "ワ", "ー", "が", "ที่", "นี่", "한", "국", "어", "ខ្", "មែ", "រ", "__num__",
    ]  # fmt: skip
    # Bigrams within a run come from word bigrams; with word_ngrams=1 they are added as tokens.
    unigrams = TextFeaturizer(word_ngrams=1)
    assert unigrams.tokens("北京人, 好") == ["北", "京", "北京", "人", "京人", ",", "好"]
    assert unigrams.tokens("北 京") == ["北", "京"]  # a space ends a run
    whole = TextFeaturizer(segment_unspaced=False)
    assert whole.tokens("我爱Python和北京!") == ["我爱python和北京", "!"]


def test_unspaced_hashes_do_not_change_between_releases():
    x = TextFeaturizer(n_buckets=2**18).transform_one("我爱北京 great")
    assert sorted(x) == [27024, 35025, 54662, 88751, 133551, 138479, 153385, 161806, 225601]
    x = TextFeaturizer(n_buckets=2**18, word_ngrams=1).transform_one("我爱北京 great")
    assert sorted(x) == [2881, 22066, 45694, 88751, 138479, 153385, 161806, 225601]


def test_segmentation_is_part_of_the_hashing_configuration():
    on, off = TextFeaturizer(), TextFeaturizer(segment_unspaced=False)
    assert on.hashing_config() != off.hashing_config()
    assert "unspaced" not in off.hashing_config()  # what featurizers made before it recorded
    # A featurizer pickled before the parameter existed maps text as it did.
    state = on.__getstate__()
    del state["segment_unspaced"]
    old = TextFeaturizer.__new__(TextFeaturizer)
    old.__dict__.update(state)
    assert old.tokens("北京 ok") == ["北京", "ok"] and old.hashing_config() == off.hashing_config()


_HAN = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)
_KANA = st.characters(min_codepoint=0x30A1, max_codepoint=0x30FA)
_HANGUL = st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3)
_THAI_CONSONANT = st.characters(min_codepoint=0x0E01, max_codepoint=0x0E2E)
_UNSPACED_RUN = st.lists(
    st.one_of(_HAN, _KANA, _HANGUL, _THAI_CONSONANT), min_size=1, max_size=8
).map("".join)
_SPACED_WORD = st.from_regex(r"[a-zà-ö]{1,8}", fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_UNSPACED_RUN | _SPACED_WORD, st.sampled_from(["", " ", ", "])), max_size=9))
def test_mixed_script_texts_give_each_letter_and_each_word(parts):
    text = "".join(piece + gap for piece, gap in parts)
    expected, pairs, run = [], [], ""
    for i, char in enumerate(text + " "):
        if "\u0e00" <= char <= "\u0e7f" or char >= "\u3000":
            expected.append(char)
            if run:
                pairs.append(run[-1] + char)
            run += char
            continue
        run = ""
        if char.isalpha() and (i == 0 or not text[i - 1].isalpha() or text[i - 1] >= "\u0e00"):
            expected.append(char)  # a word starts
        elif char.isalpha():
            expected[-1] += char
        elif char == ",":
            expected.append(",")
    assert TextFeaturizer().tokens(text) == expected
    unigrams = TextFeaturizer(word_ngrams=1).tokens(text)
    assert sorted(unigrams) == sorted(expected + pairs)
    # Only texts with such letters are tokenized differently.
    if not any(c >= "\u0e00" for c in text):
        assert TextFeaturizer(segment_unspaced=False).tokens(text) == expected


# --- caches bounded in bytes ----------------------------------------------------------------------


def _held_bytes(cache: dict) -> int:
    return sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in cache.items())


@pytest.mark.parametrize("config", [{}, {"char_ngrams": (3, 3)}], ids=str)
def test_caches_stay_within_their_byte_budget_on_long_fresh_words(config):
    budget = 2**19
    featurizer = TextFeaturizer(cache_bytes=budget, **config)
    fresh = TextFeaturizer(**config)
    one_text = 0
    for i in range(10):  # 60 kB words that never repeat: over 1 MB without the byte bound
        texts = [f"{i}{j}" + "ab" * 30_000 + f" w{i}" for j in range(2)]
        one_text = max(one_text, *(len(t.encode()) for t in texts))
        assert featurizer.transform_one(texts[0]) == fresh.transform_one(texts[0])
        batch = featurizer.buckets_many(texts)
        assert [batch.record(j) for j in range(2)] == [fresh.transform_one(t) for t in texts]
        # At most the budget, plus what the last call added before the check.
        assert _held_bytes(featurizer._hash_cache) <= budget + 2 * 8 * one_text
        word_cache, gram_cache = featurizer._chunk_caches
        held = _held_bytes(word_cache) + _held_bytes(gram_cache)
        assert held <= budget + 2 * 40 * one_text
        assert word_cache.bytes >= _held_bytes(word_cache) - sys.getsizeof(_SEPARATOR) * 2


def test_the_byte_budget_does_not_empty_caches_on_ordinary_text():
    featurizer = TextFeaturizer()
    texts = [f"the quick brown fox w{i % 50} jumps over the lazy dog" for i in range(500)]
    for text in texts:
        featurizer.transform_one(text)
    featurizer.buckets_many(texts)
    cached = len(featurizer._hash_cache)
    featurizer.transform_one(texts[0])
    assert len(featurizer._hash_cache) == cached > 10
    assert 0 < featurizer._hash_cache_bytes < 100_000
