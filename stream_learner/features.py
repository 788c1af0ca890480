"""Tokenizing and hashing text into a fixed number of feature buckets.

The featurizer is a River transformer: ``TextFeaturizer() | MultinomialNB()`` is an ordinary
River pipeline. Its output is ``{bucket_id: weight}`` with integer bucket ids in
``range(n_buckets)``. Bucket ids come from CRC-32 (with ``seed`` as the initial value) and a
multiplicative mix, so they are the same in every process and after every restart — unlike
Python's ``hash``, which is salted per process. Memory is bounded: the only state is a
token → hash cache that is emptied when it reaches ``cache_size`` entries.

>>> featurizer = TextFeaturizer(n_buckets=2**10)
>>> featurizer.tokens("Visit https://example.com, NOW!!! Call 555-1234 or mail bob@ex.org @alice")
['visit', '__url__', '__host_example_com__', ',', 'now', '!!!', 'call', '__num__', '-', '__num__', 'or', 'mail', '__email__', '__user__']
>>> x = featurizer.transform_one("Good good movie")
>>> sorted(x.values())
[1, 1, 1, 2]
>>> x == TextFeaturizer(n_buckets=2**10).transform_one("Good good movie")
True

"""

from __future__ import annotations

import collections
import functools
import re
import unicodedata
import zlib

from river import base

__all__ = ["TextFeaturizer", "stable_hash"]

# A URL does not end in sentence punctuation: "see http://x.org, then" keeps the comma.
_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"']*[^\s<>\"'.,;:!?)\]]", re.IGNORECASE)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_MENTION = re.compile(r"(?<![\w@])@\w+")
_NUMBER = re.compile(r"(?<![^\W\d])\d+(?:[.,:/]\d+)*(?![^\W\d])")
_URL_HOST = re.compile(r"(?:https?://)?(?:www\d?\.)?([^/?#:\s]+)")
_NON_WORD = re.compile(r"\W+")
_DIGIT = re.compile(r"\d")
_WORD_AND_PUNCT = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")
_WORD_ONLY = re.compile(r"\w+(?:['’]\w+)*")



@functools.lru_cache(maxsize=32)
def _kinds(normalize: bool | str) -> frozenset:
    """What ``normalize`` asks for (cached: it is read for every text)."""
    if normalize is True:
        return _KINDS
    if not normalize:
        return frozenset()
    kinds = frozenset(k.strip() for k in normalize.split(","))
    if not kinds <= _KINDS:
        raise ValueError(f"normalize: unknown kinds {sorted(kinds - _KINDS)}; known {sorted(_KINDS)}")
    return kinds


def _url_tokens(match: re.Match) -> str:
    # Keep the host: link shorteners and sites (n.pr, nyti.ms) say a lot about a text's source.
    host = _URL_HOST.match(match.group(0)).group(1)
    return f" __url__ __host_{_NON_WORD.sub('_', host)}__ "


_KINDS = frozenset({"urls", "emails", "mentions", "numbers"})
_MIX = 0x9E3779B1  # Knuth's multiplicative constant: spreads CRC-32 over the buckets.
_MASK32 = 0xFFFFFFFF


def stable_hash(token: str, seed: int = 0) -> int:
    """A 32-bit hash of ``token`` that is the same in every process.

    >>> stable_hash("hello")
    907060870
    >>> stable_hash("hello", seed=1) != stable_hash("hello")
    True

    """
    return zlib.crc32(token.encode("utf-8", "surrogatepass"), seed & _MASK32)


class TextFeaturizer(base.Transformer):
    """Text → hashed bag of words, word n-grams and character n-grams.

    Parameters
    ----------
    n_buckets
        Number of hash buckets (feature ids are ``0 .. n_buckets - 1``).
    word_ngrams
        Longest word n-gram: 1 is unigrams only, 2 adds bigrams, 3 trigrams.
    char_ngrams
        ``(min, max)`` lengths of character n-grams taken inside each word (with ``<`` and
        ``>`` marking its ends, as fastText does), or None for none.
    normalize
        Replace URLs, e-mail addresses, @mentions and numbers with the tokens ``__url__``,
        ``__email__``, ``__user__`` and ``__num__``; a URL's host is kept as ``__host_<host>__``.
        True for all four, False for none, or some of them by name: ``"urls,mentions"``.
    punctuation
        Keep runs of punctuation (``!!!``, ``:)``) as tokens.
    binary
        Weight 1 per present feature instead of its count.
    dense
        Give every bucket, absent ones as 0 (for trees, which split on values and would read
        an absent word as missing). Only sensible with few buckets.
    norm
        None for raw counts, ``"l2"`` to scale the vector to unit length (for linear models).
    seed
        Seed of the hash function: another seed, another bucket assignment.
    on
        When given, ``x`` is a dict and the text is ``x[on]``; otherwise ``x`` is the text.
    cache_size
        Most token hashes kept in memory.

    """

    def __init__(
        self,
        n_buckets: int = 2**18,
        word_ngrams: int = 2,
        char_ngrams: tuple[int, int] | None = None,
        normalize: bool | str = True,
        punctuation: bool = True,
        binary: bool = False,
        dense: bool = False,
        norm: str | None = None,
        seed: int = 0,
        on: str | None = None,
        cache_size: int = 2**17,
    ):
        self.n_buckets = n_buckets
        self.word_ngrams = word_ngrams
        self.char_ngrams = char_ngrams
        self.normalize = normalize
        self.punctuation = punctuation
        self.binary = binary
        self.dense = dense
        self.norm = norm
        self.seed = seed
        self.on = on
        self.cache_size = cache_size
        self._hash_cache: dict[str, int] = {}

    @property
    def _tags(self):
        return {base.tags.TEXT_INPUT}

    @classmethod
    def _unit_test_params(cls):
        yield {"n_buckets": 2**12}
        yield {"n_buckets": 2**12, "word_ngrams": 1, "char_ngrams": (3, 4), "norm": "l2"}

    def __getstate__(self):
        # The cache is derived data: keep it out of pickles and checkpoints.
        state = self.__dict__.copy()
        state["_hash_cache"] = {}
        return state

    @property
    def _normalized_kinds(self) -> frozenset:
        return _kinds(self.normalize)

    def hashing_config(self) -> dict:
        """What decides bucket ids. Two featurizers with equal configs map text identically."""
        return {
            "scheme": "crc32-mix-v1",
            "n_buckets": self.n_buckets,
            "word_ngrams": self.word_ngrams,
            "char_ngrams": list(self.char_ngrams) if self.char_ngrams else None,
            "normalize": self.normalize,
            "punctuation": self.punctuation,
            "seed": self.seed,
        }

    def tokens(self, text: str) -> list[str]:
        """The word tokens of ``text`` after normalization, before n-grams and hashing."""
        if text.isascii():
            text = text.lower()  # what NFKC + casefold give for ASCII, at a fraction of the cost
        else:
            text = unicodedata.normalize("NFKC", text).casefold()
        kinds = self._normalized_kinds
        if kinds:
            if "urls" in kinds and ("http" in text or "www." in text):
                text = _URL.sub(_url_tokens, text)
            if "@" in text:
                if "emails" in kinds:
                    text = _EMAIL.sub(" __email__ ", text)
                if "mentions" in kinds:
                    text = _MENTION.sub(" __user__ ", text)
            if "numbers" in kinds and _DIGIT.search(text):
                text = _NUMBER.sub(" __num__ ", text)
        pattern = _WORD_AND_PUNCT if self.punctuation else _WORD_ONLY
        return pattern.findall(text)

    def _hashes(self, tokens: list[str]) -> list[int]:
        cache = self._hash_cache
        hashes = list(map(cache.get, tokens))
        if None in hashes:
            if len(cache) + len(tokens) > self.cache_size:
                cache.clear()
            seed = self.seed & _MASK32
            for i, h in enumerate(hashes):
                if h is None:
                    token = tokens[i]
                    h = cache.get(token)
                    if h is None:
                        h = cache[token] = (
                            zlib.crc32(token.encode("utf-8", "surrogatepass"), seed) * _MIX
                        ) & _MASK32
                    hashes[i] = h
        return hashes

    def buckets(self, text: str) -> list[int]:
        """Bucket ids of every feature of ``text``, with repeats, in order."""
        tokens = self.tokens(text)
        hashes = self._hashes(tokens)
        n = self.n_buckets
        out = [h % n for h in hashes]
        if self.word_ngrams >= 2:
            # Combine the hashes of consecutive words rather than hashing joined strings:
            # the same stable result for a fraction of the cost.
            out += [
                ((((a * 0x01000193) ^ b ^ 2) & _MASK32) * _MIX & _MASK32) % n
                for a, b in zip(hashes, hashes[1:])  # noqa: B905 (lengths differ by design)
            ]
        for size in range(3, self.word_ngrams + 1):
            combined = hashes[: len(hashes) - size + 1]
            for offset in range(1, size):
                combined = [
                    ((c * 0x01000193) ^ h ^ size) & _MASK32
                    for c, h in zip(combined, hashes[offset:], strict=False)
                ]
            out.extend(((c * _MIX) & _MASK32) % n for c in combined)
        if self.char_ngrams:
            low, high = self.char_ngrams
            grams = []
            for token in tokens:
                word = f"<{token}>"
                for size in range(low, high + 1):
                    grams.extend(word[i : i + size] for i in range(len(word) - size + 1))
            out.extend(h % n for h in self._hashes(grams))
        return out

    def transform_one(self, x) -> dict[int, float]:
        text = x[self.on] if self.on is not None else x
        if not isinstance(text, str):
            return {}
        counts = collections.Counter(self.buckets(text))
        if self.binary:
            x = dict.fromkeys(counts, 1)
        elif self.norm == "l2" and counts:
            scale = sum(v * v for v in counts.values()) ** -0.5
            x = {k: v * scale for k, v in counts.items()}
        else:
            x = dict(counts)
        if self.dense:
            return {**dict.fromkeys(range(self.n_buckets), 0), **x}
        return x
