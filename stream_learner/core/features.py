"""Tokenizing and hashing text into a fixed number of feature buckets.

The featurizer is a River transformer: ``TextFeaturizer() | MultinomialNB()`` is an ordinary
River pipeline. Its output is ``{bucket_id: weight}`` with integer bucket ids in
``range(n_buckets)``. Bucket ids come from CRC-32 (with ``seed`` as the initial value) and a
multiplicative mix, so they are the same in every process and after every restart — unlike
Python's ``hash``, which is salted per process. Memory is bounded: the only state is a
token → hash cache (and the batch path's chunk caches), each emptied when it reaches
``cache_size`` entries or ``cache_bytes`` bytes.

>>> featurizer = TextFeaturizer(n_buckets=2**10)
>>> featurizer.tokens("Visit https://example.com, NOW!!! Call 555-1234 or mail bob@ex.org @alice")
['visit', '__url__', '__host_example_com__', ',', 'now', '!!!', 'call', '__num__', '-', '__num__', 'or', 'mail', '__email__', '__user__']
>>> x = featurizer.transform_one("Good good movie")
>>> sorted(x.values())
[1, 1, 1, 2]
>>> x == TextFeaturizer(n_buckets=2**10).transform_one("Good good movie")
True

A batch of texts is featurized in one pass by :meth:`TextFeaturizer.buckets_many`; its record
``i`` holds exactly what ``transform_one`` gives for text ``i``:

>>> batch = featurizer.buckets_many(["Good good movie", "", "bad"])
>>> len(batch), batch.offsets.tolist()
(3, [0, 5, 5, 6])
>>> batch.record(0) == x
True

"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import re
import sys
import unicodedata
import zlib

import numpy as np
from river import base

__all__ = ["BucketBatch", "TextFeaturizer", "stable_bucket", "stable_hash"]

# Every pattern here sees producers' text, so each runs in time linear in it: possessive
# quantifiers where a match could backtrack, and e-mails are found from their "@" (see
# _replace_emails) rather than by a pattern tried at every position of a long word.
# A URL does not end in sentence punctuation: "see http://x.org, then" keeps the comma. Linear
# as it is: it starts only at "http"/"www." and gives back at most the run's punctuation tail.
_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"']*[^\s<>\"'.,;:!?)\]]", re.IGNORECASE)
_EMAIL_DOMAIN = re.compile(r"[\w-]++(?:\.[\w-]++)++")
# An "@" a domain may follow: the others are skipped at C speed. Linear: the runs it reads after
# different "@"s do not overlap.
_EMAIL_AT = re.compile(r"@(?=[\w-]++\.[\w-])")
_EMAIL_LOCAL_PART = re.compile(r"[\w.+-]++")  # matched on the reversed text, from the "@" back
# "(?<![\w@])@\w++" with the "@" first, so that the engine skips to each "@" at C speed.
_MENTION = re.compile(r"@(?<![\w@]@)\w++")
# A digit run glued to letters gives back one digit at most before the look-ahead holds, so it
# is linear; it is left greedy because "10am" -> "__num__ 0am" is what saved models learned.
_NUMBER = re.compile(r"(?<![^\W\d])\d+(?:[.,:/]\d+)*(?![^\W\d])")
_URL_HOST = re.compile(r"(?:https?://)?(?:www\d?\.)?([^/?#:\s]++)")
_NON_WORD = re.compile(r"\W++")
_DIGIT = re.compile(r"\d")
_WORD_AND_PUNCT = re.compile(r"\w++(?:['’]\w++)*+|[^\w\s]++")
_WORD_ONLY = re.compile(r"\w++(?:['’]\w++)*+")


def _ranges_class(code_points) -> str:
    """A regex character-class body for ``code_points`` (sorted), as ranges."""
    ranges: list[list[int]] = []
    for c in code_points:
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return "".join(
        re.escape(chr(a)) + ("-" + re.escape(chr(b)) if b > a else "") for a, b in ranges
    )


# Scripts written without spaces between words. Their letters are tokens one by one (with the
# combining marks that follow them); bigrams come from word n-grams or, with word_ngrams=1,
# are added. Blocks with marks, digits or punctuation are read letter by letter; the big Han
# and Hangul syllable blocks are letters throughout.
_UNSPACED_WHOLE_BLOCKS = (
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F),
    (0x30000, 0x323AF),  # Han
    (0xAC00, 0xD7A3),  # Hangul syllables
)  # fmt: skip
_UNSPACED_MIXED_BLOCKS = (
    (0x3005, 0x3007), (0x3021, 0x3029), (0x3031, 0x3035), (0x303B, 0x303C),  # Han marks, numerals
    (0x3040, 0x30FF), (0x31F0, 0x31FF),  # Hiragana, Katakana
    (0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xD7B0, 0xD7FF),  # Hangul jamo
    (0x0E00, 0x0E7F), (0x0E80, 0x0EFF),  # Thai, Lao
    (0x1780, 0x17FF), (0x19E0, 0x19FF),  # Khmer
    (0x1000, 0x109F), (0xA9E0, 0xA9FF), (0xAA60, 0xAA7F),  # Myanmar
)  # fmt: skip


def _unspaced_classes() -> tuple[str, str]:
    """Character-class bodies of the letters and of the combining marks of those scripts."""
    letters, marks = [], []
    for low, high in _UNSPACED_MIXED_BLOCKS:
        for c in range(low, high + 1):
            char = chr(c)
            if char.isalnum() and not char.isdecimal():  # digits stay numbers
                letters.append(c)
            elif unicodedata.category(char).startswith("M"):
                marks.append(c)
    whole = "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in _UNSPACED_WHOLE_BLOCKS)
    return _ranges_class(letters) + whole, _ranges_class(marks)


_UNSPACED_LETTERS, _UNSPACED_MARKS = _unspaced_classes()
_UNSPACED_LETTER = re.compile(f"[{_UNSPACED_LETTERS}]")
# A letter of those scripts (group 1) or, as _WORD_AND_PUNCT, a word of other letters or a run
# of punctuation.
_UNSPACED_WORD = rf"[^\W{_UNSPACED_LETTERS}]++(?:['’][^\W{_UNSPACED_LETTERS}]++)*+"
_UNSPACED_LETTER_AND_WORD_AND_PUNCT = re.compile(
    rf"([{_UNSPACED_LETTERS}][{_UNSPACED_MARKS}]*+)|{_UNSPACED_WORD}|[^\w\s]++"
)
_UNSPACED_LETTER_AND_WORD = re.compile(
    rf"([{_UNSPACED_LETTERS}][{_UNSPACED_MARKS}]*+)|{_UNSPACED_WORD}"
)

# NFKC's canonical reordering is quadratic in the length of a run of combining marks (CPython
# sorts them by insertion): a run is cut to 30 marks first, the limit of Unicode's stream-safe
# format (UAX #15), which real text never reaches (Zalgo text can). Marks are the characters
# with a combining class, and the few without one that decompose into marks (tested).
_DECOMPOSE_INTO_MARKS = (0x0F73, 0x0F75, 0x0F81, 0xFF9E, 0xFF9F)
_MARK_CODES = sorted(
    {c for c in range(0x300, 0x1F000) if unicodedata.combining(chr(c))} | set(_DECOMPOSE_INTO_MARKS)
)
# Two patterns: a class with characters beyond the BMP is checked range by range, one below it
# by a bitmap, and the second is needed only when a text holds such characters.
_BMP_MARK = f"[{_ranges_class(c for c in _MARK_CODES if c <= 0xFFFF)}]"
_ASTRAL_MARK = f"[{_ranges_class(c for c in _MARK_CODES if c > 0xFFFF)}]"
_ANY_MARK = f"(?:{_BMP_MARK}|(?=[\U00010000-\U0010ffff]){_ASTRAL_MARK})"
_LONG_BMP_MARK_RUN = re.compile(f"({_BMP_MARK}{{30}}){_BMP_MARK}++")
_LONG_MARK_RUN = re.compile(f"({_ANY_MARK}{{30}}){_ANY_MARK}++")
_BEYOND_BMP = re.compile("[\U00010000-\U0010ffff]")


def _nfkc_casefold(text: str) -> str:
    """``text`` in NFKC, case-folded; runs of more than 30 combining marks cut to 30."""
    # One scan for what ordinary text seldom holds: combining marks, characters beyond the
    # BMP, characters NFKC expands to 4 or more; each is looked for from the first of them.
    found = _MARK_OR_BEYOND_BMP_OR_EXPANDING.search(text)
    if found is None:
        return unicodedata.normalize("NFKC", text).casefold()
    start = found.start()
    long_run = _LONG_MARK_RUN if _BEYOND_BMP.search(text, start) else _LONG_BMP_MARK_RUN
    if long_run.search(text, start):
        text = long_run.sub(r"\1", text)
    expands = _EXPANDING.search(text, start) is not None
    if expands and len(text) >= _EXPAND_AHEAD_FROM:
        text = text.translate(_NFKC_EXPANSIONS)
    return unicodedata.normalize("NFKC", text).casefold()


def _nfkc_expansions() -> dict[int, str]:
    """Characters whose NFKC form is 4 characters or more (U+FDFA: 18) and that NFKC maps
    alone: their forms neither start with what composes with a preceding character nor end
    with what composes with or is reordered against a following one (tested). CPython's NFKC
    takes about 60 ns per character it writes; ``str.translate`` writes these forms at a
    fraction of that, and NFKC then finds them normalized already (code point → form)."""
    firsts, seconds, long_forms = set(), set(), []
    for code in range(0x20000):  # all canonical pairs and long forms lie below U+20000 (tested)
        mapping = unicodedata.decomposition(chr(code))
        if not mapping:
            continue
        if mapping[0] != "<" and " " in mapping:
            first, second = mapping.split()
            firsts.add(chr(int(first, 16)))
            seconds.add(chr(int(second, 16)))
        if len(unicodedata.normalize("NFKC", chr(code))) >= 4:
            long_forms.append(code)

    def hangul(char: str) -> bool:  # jamo and syllables compose algorithmically
        return 0x1100 <= ord(char) <= 0x11FF or 0xAC00 <= ord(char) <= 0xD7A3

    table = {}
    for code in long_forms:
        char = chr(code)
        form = unicodedata.normalize("NFKC", char)
        if unicodedata.combining(char):
            continue
        ends = [unicodedata.normalize("NFKD", char), form]
        if all(
            not unicodedata.combining(s[0]) and not unicodedata.combining(s[-1])
            and s[0] not in seconds and s[-1] not in firsts
            and not hangul(s[0]) and not hangul(s[-1])
            for s in ends
        ):  # fmt: skip
            table[code] = form
    return table


_NFKC_EXPANSIONS = _nfkc_expansions()
_EXPANDING = re.compile(f"[{_ranges_class(sorted(_NFKC_EXPANSIONS))}]")
_MARK_OR_BEYOND_BMP_OR_EXPANDING = re.compile(
    f"[{_ranges_class(c for c in _MARK_CODES if c <= 0xFFFF)}\U00010000-\U0010ffff"
    f"{_ranges_class(sorted(_NFKC_EXPANSIONS))}]"
)


# From this many characters on, a text's repeated chunks, tokens and word pairs are worked on
# once (a shortcut: same features, same order).
_COUNT_FROM = 1024
_EXPAND_AHEAD_FROM = 256  # characters: below, NFKC's own expansion costs next to nothing

# Ends each text of a batch. Should a text hold the same chunk, buckets_many finds more ends
# than texts and takes the per-text path instead.
_SEPARATOR = "\x00\x00"
# What the chunk caches give for the separator. A token whose hash it is (one in 2^32) would
# add an end too many: that batch takes the per-text path.
_NOT_A_HASH = 0xFFFFFFFF
_NOT_A_HASH_BYTES = _NOT_A_HASH.to_bytes(4, "little")


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


def _replace_emails(text: str) -> str:
    r"""``text`` with each e-mail address replaced by `` __email__ ``: what
    ``re.sub(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+", " __email__ ", text)`` gives, in linear time.
    That pattern, tried at every position of a long word not followed by an address, rescans
    the rest of the word each time (quadratic); here each "@" a domain follows is tried once,
    its local part read backwards from it, never past the previous "@" or address.
    """
    pieces = []
    done = 0  # text[:done] is settled
    reversed_text = None
    size = len(text)
    # A domain holds no "@": the candidates after an address are those after its domain.
    for candidate in _EMAIL_AT.finditer(text):
        at = candidate.start()
        if at > done:
            if reversed_text is None:
                reversed_text = text[::-1]
            local = _EMAIL_LOCAL_PART.match(reversed_text, size - at, size - done)
            if local is not None:
                pieces.append(text[done : at - (local.end() - local.start())])
                pieces.append(" __email__ ")
                done = _EMAIL_DOMAIN.match(text, at + 1).end()
    if not pieces:
        return text
    pieces.append(text[done:])
    return "".join(pieces)


_KINDS = frozenset({"urls", "emails", "mentions", "numbers"})
# Knuth's multiplicative constant. Multiplying by an odd number mod 2**32 is a bijection: it
# neither adds nor removes collisions between 32-bit hashes. With a power-of-two n_buckets a
# bucket id is the product's low bits, which depend only on the hash's low bits, so the mix
# only permutes the buckets; it spreads nothing that CRC-32 (uniform in every bit) does not
# spread already. Kept because bucket ids, and so every saved model, depend on it.
_MIX = 0x9E3779B1
_MASK32 = 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class BucketBatch:
    """The features of a batch of records in compressed sparse row form.

    Record ``i``'s bucket ids are ``ids[offsets[i]:offsets[i + 1]]``. With ``weights`` None
    each entry weighs 1 and an id may repeat (its weight is its count, as in
    :meth:`TextFeaturizer.buckets`); otherwise ``weights`` has one weight per entry and ids do
    not repeat within a record. The order of the ids within a record carries no meaning.
    :meth:`NeuralClassifier.learn_many <stream_learner.learners.neural.model.NeuralClassifier.learn_many>`
    and its ``predict_many`` take a BucketBatch directly (their fastest input).

    >>> batch = BucketBatch(ids=np.array([3, 5, 3]), offsets=np.array([0, 2, 3]))
    >>> [batch.record(i) for i in range(len(batch))]
    [{3: 1, 5: 1}, {3: 1}]

    """

    ids: np.ndarray
    offsets: np.ndarray
    weights: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def record(self, i: int) -> dict:
        """Record ``i`` as the ``{bucket_id: weight}`` dict ``transform_one`` gives."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.ids[start:end].tolist()
        if self.weights is None:
            return dict(collections.Counter(ids))
        return dict(zip(ids, self.weights[start:end].tolist(), strict=True))

    def take(self, records) -> BucketBatch:
        """The batch of records ``records`` (positions), in that order.

        >>> batch = BucketBatch(ids=np.array([3, 5, 3, 7]), offsets=np.array([0, 2, 3, 4]))
        >>> part = batch.take([2, 0])
        >>> [part.record(i) for i in range(len(part))]
        [{7: 1}, {3: 1, 5: 1}]

        """
        records = np.asarray(records, dtype=np.intp)
        starts = self.offsets[records]
        lengths = self.offsets[records + 1] - starts
        offsets = np.zeros(records.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Entry k of the new batch is entry (k - its record's new start + its old start).
        entries = np.arange(offsets[-1]) + np.repeat(starts - offsets[:-1], lengths)
        weights = None if self.weights is None else self.weights[entries]
        return BucketBatch(ids=self.ids[entries], offsets=offsets, weights=weights)


_crc32 = zlib.crc32
_getsizeof = sys.getsizeof
# Bytes a cache entry costs beyond its key and value: the dict's slot and index; the int.
_TOKEN_ENTRY_BYTES = 72
_CHUNK_ENTRY_BYTES = 120  # and the headers of the key and value


def stable_hash(token: str, seed: int = 0) -> int:
    """A 32-bit hash of ``token`` that is the same in every process.

    >>> stable_hash("hello")
    907060870
    >>> stable_hash("hello", seed=1) != stable_hash("hello")
    True

    """
    return zlib.crc32(token.encode("utf-8", "surrogatepass"), seed & _MASK32)


def stable_bucket(token: str, n_buckets: int, seed: int = 0) -> int:
    """The bucket of ``token`` among ``n_buckets``, as the featurizer assigns it.

    >>> stable_bucket("hello", 2**18) == stable_bucket("hello", 2**18)
    True

    """
    return ((stable_hash(token, seed) * _MIX) & _MASK32) % n_buckets


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
    cache_bytes
        Most memory each cache may hold (the token cache; the batch path's chunk caches),
        estimated from the sizes of its keys and values: a cache is emptied when it grows
        past either bound, so a stream of long, never repeated words cannot exhaust memory.
    segment_unspaced
        Split runs of scripts written without spaces between words (Han, Hiragana, Katakana,
        Hangul, Thai, Lao, Khmer, Myanmar) into letters: each letter is a token, and the
        letter bigrams within a run are features (as word bigrams; added when
        ``word_ngrams=1``). Off, such a run is one long word.

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
        cache_bytes: int = 2**25,
        segment_unspaced: bool = True,
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
        self.cache_bytes = cache_bytes
        self.segment_unspaced = segment_unspaced
        self._hash_cache: dict[str, int] = {}
        self._hash_cache_bytes = 0

    # What a featurizer pickled before these parameters existed did.
    segment_unspaced = False
    cache_bytes = 2**25
    _hash_cache_bytes = 0

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
        state["_hash_cache_bytes"] = 0
        state.pop("_chunk_caches", None)
        return state

    @property
    def _normalized_kinds(self) -> frozenset:
        return _kinds(self.normalize)

    def hashing_config(self) -> dict:
        """What decides bucket ids. Two featurizers with equal configs map text identically."""
        config = {
            "scheme": "crc32-mix-v1",
            "n_buckets": self.n_buckets,
            "word_ngrams": self.word_ngrams,
            "char_ngrams": list(self.char_ngrams) if self.char_ngrams else None,
            "normalize": self.normalize,
            "punctuation": self.punctuation,
            "seed": self.seed,
        }
        if self.segment_unspaced:  # absent when off: the config of a featurizer made before it
            config["unspaced"] = "letters-v1"
        return config

    def tokens(self, text: str) -> list[str]:
        """The word tokens of ``text`` after normalization, before n-grams and hashing."""
        if text.isascii():
            text = text.lower()  # what NFKC + casefold give for ASCII, at a fraction of the cost
        else:
            text = _nfkc_casefold(text)
        return self._split_tokens(text)

    def _split_tokens(self, text: str) -> list[str]:
        """``text`` (already lower-cased) → tokens: the normalizations, then the tokenizer."""
        kinds = self._normalized_kinds
        if kinds:
            size = len(text)
            if "urls" in kinds and ("http" in text or "www." in text):
                text = _URL.sub(_url_tokens, text)
            if "@" in text:
                if "emails" in kinds:
                    text = _replace_emails(text)
                if "mentions" in kinds:
                    text = _MENTION.sub(" __user__ ", text)
            if "numbers" in kinds and _DIGIT.search(text):
                text = _NUMBER.sub(" __num__ ", text)
            if len(text) >= _COUNT_FROM and len(text) * 4 > size * 5:
                # Replaced by many placeholders ("@a@a…", "a@b.a@b.…", "1 1 1…"): the
                # placeholders repeat, so do the chunks between them.
                return self._tokenize_by_chunk(text)
        # What _tokenize does, inline: this runs for every text.
        if self.segment_unspaced and not text.isascii() and _UNSPACED_LETTER.search(text):
            return self._split_unspaced(text)
        return (_WORD_AND_PUNCT if self.punctuation else _WORD_ONLY).findall(text)

    def _tokenize_by_chunk(self, text: str) -> list[str]:
        """``_tokenize(text)``, each distinct whitespace-free chunk tokenized once when chunks
        repeat (no token spans whitespace)."""
        chunks = text.split()
        tokens_of = dict.fromkeys(chunks)
        if len(tokens_of) * 4 > len(chunks):
            return self._tokenize(text)
        for chunk in tokens_of:
            tokens_of[chunk] = self._tokenize(chunk)
        return list(itertools.chain.from_iterable(map(tokens_of.__getitem__, chunks)))

    def _tokenize(self, text: str) -> list[str]:
        """Normalized ``text`` → tokens."""
        if self.segment_unspaced and not text.isascii() and _UNSPACED_LETTER.search(text):
            return self._split_unspaced(text)
        pattern = _WORD_AND_PUNCT if self.punctuation else _WORD_ONLY
        return pattern.findall(text)

    def _split_unspaced(self, text: str) -> list[str]:
        """The tokens of a text with letters of scripts written without spaces: each such
        letter is a token; with ``word_ngrams=1`` each pair of them side by side is one too."""
        if self.punctuation:
            pattern = _UNSPACED_LETTER_AND_WORD_AND_PUNCT
        else:
            pattern = _UNSPACED_LETTER_AND_WORD
        add_pairs = self.word_ngrams < 2
        tokens = []
        previous, previous_end = None, -1  # the last letter token and where it ended
        for match in pattern.finditer(text):
            token = match.group()
            tokens.append(token)
            if match.lastindex is None:
                previous = None
                continue
            if add_pairs and previous is not None and match.start() == previous_end:
                tokens.append(previous + token)
            previous, previous_end = token, match.end()
        return tokens

    def _hashes(self, tokens: list[str]) -> list[int]:
        cache = self._hash_cache
        hashes = list(map(cache.get, tokens))
        if None in hashes:
            if (
                len(cache) + len(tokens) > self.cache_size
                or self._hash_cache_bytes > self.cache_bytes
            ):
                cache.clear()
                self._hash_cache_bytes = 0
            seed = self.seed & _MASK32
            added = 0
            for i, h in enumerate(hashes):
                if h is None:
                    token = tokens[i]
                    h = cache.get(token)
                    if h is None:
                        h = cache[token] = (
                            zlib.crc32(token.encode("utf-8", "surrogatepass"), seed) * _MIX
                        ) & _MASK32
                        added += _getsizeof(token) + _TOKEN_ENTRY_BYTES
                    hashes[i] = h
            self._hash_cache_bytes += added
        return hashes

    def buckets(self, text: str) -> list[int]:
        """Bucket ids of every feature of ``text``, with repeats, in order."""
        return self._token_buckets(self.tokens(text))

    def _token_buckets(self, tokens: list[str]) -> list[int]:
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
            out.extend(h % n for h in self._hashes(self._char_grams(tokens)))
        return out

    def _long_text_counts(self, text: str) -> collections.Counter:
        """``Counter(self.buckets(text))``: the same counts in the same order. A text with many
        tokens per character has short ones, so it repeats them: each distinct token and word
        pair is hashed once, and a text NFKC expanded (U+FDFA: 18 characters, 4 tokens) is
        tokenized a distinct chunk at a time. Ordinary text takes the path of ``buckets``."""
        lowered = text.lower() if text.isascii() else _nfkc_casefold(text)
        tokens = token_counts = None
        if len(lowered) * 2 > len(text) * 3:
            tokens, token_counts = self._split_tokens_by_chunk(lowered)
        else:
            tokens = self._split_tokens(lowered)
            if len(tokens) * 4 < len(lowered):  # ordinary text: 1 token per 5 to 7 characters
                return collections.Counter(self._token_buckets(tokens))
        if token_counts is None:
            token_counts = collections.Counter(tokens)
        # Insertion order as Counter(buckets) has it: unigrams in order of first occurrence,
        # then word pairs; learners sum features in this order.
        hashes = self._hashes(list(token_counts))
        n = self.n_buckets
        counts = collections.Counter()
        get = counts.get
        for h, count in zip(hashes, token_counts.values(), strict=True):
            bucket = h % n
            counts[bucket] = get(bucket, 0) + count
        if self.word_ngrams >= 2 and len(tokens) > 1:
            hash_of = dict(zip(token_counts, hashes, strict=True))
            pairs = collections.Counter(zip(tokens, tokens[1:], strict=False))
            for (a, b), count in pairs.items():
                pair = ((hash_of[a] * 0x01000193) ^ hash_of[b] ^ 2) & _MASK32  # as in buckets
                bucket = (pair * _MIX & _MASK32) % n
                counts[bucket] = get(bucket, 0) + count
        return counts

    def _split_tokens_by_chunk(self, text: str):
        """``text``'s tokens (None when not needed: word_ngrams=1) and their counts (None when
        not counted), tokenizing each distinct whitespace-free chunk once when chunks repeat."""
        chunks = text.split()
        chunk_counts = collections.Counter(chunks)
        split = self._split_tokens
        if len(chunk_counts) * 4 > len(chunks):
            return split(text), None
        # The tokens of a text are its chunks' tokens in order (see buckets_many).
        tokens_of = {chunk: split(chunk) for chunk in chunk_counts}
        if self.word_ngrams >= 2:
            return list(itertools.chain.from_iterable(map(tokens_of.__getitem__, chunks))), None
        token_counts = {}
        for chunk, count in chunk_counts.items():
            for token in tokens_of[chunk]:
                token_counts[token] = token_counts.get(token, 0) + count
        return None, token_counts

    def buckets_many(self, xs) -> BucketBatch:
        """The features of a batch of records in one pass, as a :class:`BucketBatch` whose
        record ``i`` holds exactly what ``transform_one(xs[i])`` gives (same bucket ids, same
        weights). On batches of a hundred or more it costs a fraction of one ``transform_one``
        per record: the batch is lower-cased text by text, then split on whitespace once;
        each distinct whitespace-free chunk is normalized, tokenized and hashed once and kept
        in a cache (bounded by ``cache_size`` and ``cache_bytes``, like the token cache), and
        the word n-grams of the whole batch are combined in numpy.

        >>> featurizer = TextFeaturizer(n_buckets=2**10, binary=True)
        >>> batch = featurizer.buckets_many(["a a b", "b"])
        >>> batch.record(0) == featurizer.transform_one("a a b")
        True

        """
        if self.dense:
            raise ValueError("buckets_many gives sparse features: use transform_one with dense=True")
        on = self.on
        texts = [x[on] for x in xs] if on is not None else list(xs)
        n = len(texts)
        end = f" {_SEPARATOR} "
        try:
            joined = end.join(texts) + end
        except TypeError:  # transform_one gives {} for what is not a string
            texts = [t if isinstance(t, str) else "" for t in texts]
            joined = end.join(texts) + end
        # What tokens() starts with, text by text (NFKC + casefold may put a space anywhere).
        if joined.isascii():
            joined = joined.lower()
        else:
            joined = end.join(t.lower() if t.isascii() else _nfkc_casefold(t) for t in texts) + end
        # Every match of the tokenizer and of the normalizations lies inside a whitespace-free
        # chunk (none spans whitespace; their look-arounds read whitespace as a text's end), so a
        # text's tokens are its chunks' tokens in order: tokenize each distinct chunk once.
        chunks = joined.split()
        word_cache, gram_cache = self._chunk_caches_for(chunks)
        hashes = np.frombuffer(b"".join(map(word_cache.__getitem__, chunks)), dtype=np.uint32)
        ends = np.flatnonzero(hashes == _NOT_A_HASH)  # where each record's chunks end
        grams = None
        if self.char_ngrams:
            grams = np.frombuffer(b"".join(map(gram_cache.__getitem__, chunks)), dtype=np.uint32)
        if ends.size != n or (grams is not None and np.count_nonzero(grams == _NOT_A_HASH) != n):
            lists = [self._buckets_with_repeats(t) if isinstance(t, str) else [] for t in texts]
            return self._weigh(*_concatenate(lists))
        ids, offsets = self._word_features(hashes, ends)
        if grams is not None:
            ids, offsets = self._add_char_features(ids, offsets, grams)
        return self._weigh(ids, offsets)

    def _buckets_with_repeats(self, text: str) -> list[int]:
        """``buckets(text)``, in another order for a long text (cheaper on hostile ones)."""
        if len(text) >= _COUNT_FROM and self.word_ngrams <= 2 and not self.char_ngrams:
            return list(self._long_text_counts(text).elements())
        return self.buckets(text)

    def _chunk_caches_for(self, chunks: list[str]):
        """The chunk → token hashes and chunk → character n-gram hashes caches. A chunk missing
        from the first is tokenized and hashed on lookup (and entered in both)."""
        caches = getattr(self, "_chunk_caches", None)
        if (
            caches is None
            or len(caches[0]) + len(chunks) > self.cache_size
            or caches[0].bytes > self.cache_bytes
        ):
            # Emptied when full, as the token cache: memory stays bounded on a stream.
            word_cache = _ChunkCache(self)
            word_cache[_SEPARATOR] = _NOT_A_HASH_BYTES
            caches = self._chunk_caches = (word_cache, {_SEPARATOR: _NOT_A_HASH_BYTES})
        return caches

    def _chunk_entry(self, chunk: str) -> bytes:
        tokens = self._split_tokens(chunk)
        seed = self.seed & _MASK32
        if self.char_ngrams:
            word_cache, gram_cache = self._chunk_caches
            grams = gram_cache[chunk] = _hash_bytes(self._char_grams(tokens), seed)
            word_cache.bytes += len(grams) + _CHUNK_ENTRY_BYTES
        return _hash_bytes(tokens, seed)

    def _char_grams(self, tokens: list[str]) -> list[str]:
        low, high = self.char_ngrams
        grams = []
        for token in tokens:
            word = f"<{token}>"
            for size in range(low, high + 1):
                grams.extend(word[i : i + size] for i in range(len(word) - size + 1))
        return grams

    def _word_features(self, hashes: np.ndarray, ends: np.ndarray):
        """Word n-gram bucket ids of the records whose token hashes are ``hashes`` (uint32),
        each record's followed by ``_NOT_A_HASH`` (at ``ends``) → (ids, offsets). The arithmetic
        of :meth:`buckets` for all n-grams of the batch at once: uint32 products wrap around
        as its ``& _MASK32`` does."""
        n_grams = max(self.word_ngrams, 1)
        length = hashes.size
        is_end = np.zeros(length, dtype=bool)
        is_end[ends] = True
        prime, mix = np.uint32(0x01000193), np.uint32(_MIX)
        features = np.zeros((length, n_grams), dtype=np.uint32)
        valid = np.zeros((length, n_grams), dtype=bool)
        features[:, 0] = self._bucket_of_hash(hashes)
        np.logical_not(is_end, out=valid[:, 0])
        for size in range(2, n_grams + 1):
            count = length - size + 1
            if count <= 0:
                break
            combined = hashes[:count]
            for offset in range(1, size):
                combined = (combined * prime) ^ hashes[offset : offset + count] ^ np.uint32(size)
            features[:count, size - 1] = self._bucket_of_hash(combined * mix)
            # An n-gram is a feature when none of its words is a record's end.
            np.logical_and(valid[:count, size - 2], ~is_end[size - 1 :], out=valid[:count, size - 1])
        ids = features[valid].astype(np.int64)
        ends_at = np.cumsum(valid.sum(axis=1))
        offsets = np.zeros(ends.size + 1, dtype=np.int64)
        offsets[1:] = ends_at[ends]
        return ids, offsets

    def _bucket_of_hash(self, hashes: np.ndarray) -> np.ndarray:
        """``hash % n_buckets`` of uint32 hashes."""
        n = self.n_buckets
        if n >= 2**32:
            return hashes
        if n & (n - 1) == 0:
            return hashes & np.uint32(n - 1)
        return hashes % np.uint32(n)

    def _add_char_features(self, ids, offsets, hashes):
        """Append each record's character n-gram ids (``hashes``: their hashes, each record's
        followed by ``_NOT_A_HASH``) to its word features."""
        is_end = hashes == _NOT_A_HASH
        ends = np.flatnonzero(is_end)
        gram_ids = self._bucket_of_hash(hashes[~is_end]).astype(np.int64)
        gram_offsets = np.zeros(offsets.size, dtype=np.int64)
        gram_offsets[1:] = ends - np.arange(ends.size)
        merged = np.empty(ids.size + gram_ids.size, dtype=np.int64)
        records = np.arange(offsets.size - 1)
        # Record r: its word features after all earlier records' features, then its grams.
        word_record = np.repeat(records, np.diff(offsets))
        merged[np.arange(ids.size) + gram_offsets[word_record]] = ids
        gram_record = np.repeat(records, np.diff(gram_offsets))
        merged[np.arange(gram_ids.size) + offsets[gram_record + 1]] = gram_ids
        return merged, offsets + gram_offsets

    def _weigh(self, ids: np.ndarray, offsets: np.ndarray) -> BucketBatch:
        """Ids with repeats → the batch transform_one's weights describe."""
        if not (self.binary or self.norm == "l2") or not ids.size:
            return BucketBatch(ids=ids, offsets=offsets)
        n = offsets.size - 1
        records = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
        keys = records * self.n_buckets + ids  # sorted: by record, then by bucket
        keys.sort()
        first = np.ones(keys.size, dtype=bool)
        np.not_equal(keys[1:], keys[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        counts = np.diff(starts, append=keys.size).astype(np.float64)
        records, ids = np.divmod(keys[starts], self.n_buckets)
        offsets = np.searchsorted(records, np.arange(n + 1))
        if self.binary:
            weights = np.ones(starts.size)
        else:
            # The scale in Python floats, as transform_one computes it (numpy's power may
            # round differently).
            squares = np.bincount(records, weights=counts * counts, minlength=n)
            scale = np.array([s ** -0.5 if s else 0.0 for s in squares.tolist()])
            weights = counts * scale[records]
        return BucketBatch(ids=ids, offsets=offsets.astype(np.int64), weights=weights)

    def transform_one(self, x) -> dict[int, float]:
        text = x[self.on] if self.on is not None else x
        if not isinstance(text, str):
            return {}
        if len(text) >= _COUNT_FROM and self.word_ngrams <= 2 and not self.char_ngrams:
            counts = self._long_text_counts(text)
        else:
            counts = collections.Counter(self._token_buckets(self.tokens(text)))
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


def _concatenate(lists: list[list[int]]):
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in lists], out=offsets[1:])
    return np.fromiter(itertools.chain.from_iterable(lists), np.int64, count=int(offsets[-1])), offsets



class _ChunkCache(dict):
    """chunk → the uint32 bytes of its tokens' hashes, computed on a miss."""

    __slots__ = ("_featurizer", "_seed", "_punctuation", "_simple", "_segment", "bytes")

    def __init__(self, featurizer: TextFeaturizer):
        super().__init__()
        self._featurizer = featurizer
        self._seed = featurizer.seed & _MASK32
        self._punctuation = featurizer.punctuation
        self._simple = not featurizer.char_ngrams
        self._segment = featurizer.segment_unspaced
        self.bytes = 0  # estimated size of the entries of this cache and of its gram cache

    def __missing__(self, chunk: str) -> bytes:
        value = self[chunk] = self._entry(chunk)
        # Four bytes a character for the key: exact for the widest strings, safe for others.
        self.bytes += 4 * len(chunk) + len(value) + _CHUNK_ENTRY_BYTES
        return value

    def _entry(self, chunk: str) -> bytes:
        # Most chunks are a word, maybe with an apostrophe inside or a punctuation mark before
        # or after it. Letters are \w; a non-\w character next to letters is punctuation that no
        # normalization takes (mentions need "@", e-mails "@" and \w after it, numbers digits).
        seed = self._seed
        if self._simple and (
            chunk.isascii() or not self._segment or not _UNSPACED_LETTER.search(chunk)
        ):
            if chunk.isalpha() or (
                chunk.replace("'", "").isalpha()
                and "''" not in chunk
                and chunk[0] != "'"
                and chunk[-1] != "'"
            ):
                return (
                    (_crc32(chunk.encode("utf-8", "surrogatepass"), seed) * _MIX) & _MASK32
                ).to_bytes(4, "little")
            # Two tokens at most: concatenated, without _hash_bytes' list and join.
            head, tail = chunk[:-1], chunk[-1]
            if head.isalpha() and not (tail.isalnum() or tail == "_" or tail == "@"):
                value = _hash4(head, seed)
                if self._punctuation:
                    value += _hash4(tail, seed)
                return value
            head, tail = chunk[0], chunk[1:]
            if tail.isalpha() and not (head.isalnum() or head == "_" or head == "@"):
                value = _hash4(tail, seed)
                if self._punctuation:
                    value = _hash4(head, seed) + value
                return value
        return self._featurizer._chunk_entry(chunk)


def _hash4(token: str, seed: int) -> bytes:
    """The mixed hash of ``token`` (what ``_hashes`` gives) as 4 little-endian bytes."""
    return ((_crc32(token.encode("utf-8", "surrogatepass"), seed) * _MIX) & _MASK32).to_bytes(4, "little")


class _HashBytesOf(dict):
    """token → ``_hash4(token, seed)``, computed on a miss."""

    __slots__ = ("_seed",)

    def __init__(self, seed: int):
        super().__init__()
        self._seed = seed

    def __missing__(self, token: str) -> bytes:
        value = self[token] = _hash4(token, self._seed)
        return value


def _hash_bytes(tokens, seed: int) -> bytes:
    """The mixed hashes of ``tokens`` (what ``_hashes`` gives) as the bytes of a uint32 array."""
    if len(tokens) > 64:  # a long chunk: each distinct token hashed once
        return b"".join(map(_HashBytesOf(seed).__getitem__, tokens))
    return b"".join(
        [
            ((zlib.crc32(t.encode("utf-8", "surrogatepass"), seed) * _MIX) & _MASK32).to_bytes(4, "little")
            for t in tokens
        ]
    )
