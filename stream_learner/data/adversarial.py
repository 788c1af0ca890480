"""Texts built to make a tokenizer slow: the worst cases a hostile producer could send.

Each case is a long run of what some pattern in the decoder or the featurizer reads (word
characters, e-mail and URL characters, digits, punctuation, letters of scripts written without
spaces, combining marks, characters that NFKC or case folding expand), usually with the
near-miss ending that once made a pattern backtrack over the whole run. Tests feed them to every
registered learner's featurizer under a generous time guard; ``benchmarks/adversarial.py``
times them against ordinary text of the same size.

>>> cases = worst_cases(1024)
>>> len(cases["email_near_miss"].encode()) <= 1024
True
>>> cases["email_near_miss"][-5:]
'aa @b'
>>> all(len(text.encode()) <= 1024 for text in cases.values())
True

"""

from __future__ import annotations

__all__ = ["PIECES", "worst_cases"]

# Units a case repeats, and the endings that turn a run into a near miss.
PIECES = (
    "a", "é", "_", "1", "١", "๑", ".", ",", "!", "?", "'", "’", "@", "-", "+", "/", ":", "#",
    "(", ")", "<", ">", '"', " ", "\t", "\n", "\x00", "\x01", "\u200b", "\ufeff",
    "a.", "a@", "@a", "a'", "1.", "1a", "a1", "1,", "http://", "www.", "://", "..", "?!",
    "中", "か", "カ", "한", "\u1100\u1161", "ก", "ที่", "ລ", "ក្", "ကြ", "a中", "中a",
    "\u0301", "\u0316", "e\u0301", "\u0f73", "\uff9e", "ß", "ﬃ", "\ufdfa", "Ａ", "İ", "ǅ", "\U0001f600",
)  # fmt: skip
ENDINGS = ("", " @b", "@b", "@b.c", " http://", "www.", "a", "1", ".", "!", "中", "\u0301")


def _fill(unit: str, size: int, head: str = "", tail: str = "") -> str:
    """``head + unit * k + tail`` with k as large as fits in ``size`` UTF-8 bytes."""
    room = size - len(head.encode()) - len(tail.encode())
    return head + unit * max(room // len(unit.encode()), 0) + tail


def worst_cases(size: int = 60_000) -> dict[str, str]:
    """The fixed corpus: name → a text of at most ``size`` UTF-8 bytes."""
    cases = {
        # e-mails: a long local part with no address after it, and addresses that never close
        "email_near_miss": _fill("a", size, tail=" @b"),
        "email_local_part_chars": _fill("a.+-", size, tail=" @b"),
        "email_at_no_domain": _fill("a", size, tail="@"),
        "email_many_at": _fill("a@", size),
        "email_domain_dots": _fill("b.", size, head="a@"),
        "email_chain": _fill("a@b.", size),
        "at_signs": _fill("@", size),
        "mentions": _fill("@a", size),
        # URLs: a prefix, then a run the last character of which is never allowed
        "url_punctuation_tail": _fill(".", size, head="http://"),
        "url_mixed_tail": _fill(",.;:!?)]", size, head="www.a"),
        "url_prefixes": _fill("http://", size),
        "url_www": _fill("www.", size),
        "url_no_host": _fill("http:// ", size),
        # numbers: long digit runs, glued to letters, separated by what joins numbers
        "digits": _fill("1", size),
        "digits_then_letter": _fill("1", size, tail="a"),
        "letter_then_digits": _fill("1", size, head="a"),
        "number_separators": _fill("1.", size, tail="a"),
        "digits_letters": _fill("1a", size),
        "arabic_indic_digits": _fill("١", size),
        # words and punctuation
        "long_word": _fill("a", size),
        "long_accented_word": _fill("é", size),
        "apostrophes": _fill("a'", size),
        "double_apostrophes": _fill("''a", size),
        "punctuation": _fill("!", size),
        "mixed_punctuation": _fill("!?.,;:", size),
        "many_short_words": _fill("a ", size),
        "batch_separator": _fill("\x00\x00 ", size),
        "control_characters": _fill("\x01", size, head="a"),
        "zero_width": _fill("a\u200b", size),
        # scripts and Unicode normalization
        "han": _fill("中", size),
        "kana_and_han": _fill("東京タワー", size),
        "hangul_jamo": _fill("\u1100\u1161", size),
        "thai_with_marks": _fill("ที่", size),
        "khmer": _fill("ក្ម", size),
        "mixed_scripts": _fill("a中ก1", size),
        "emoji": _fill("\U0001f600", size),
        "combining_marks_reordered": _fill("\u0301\u0316", size, head="a"),
        "combining_marks_alone": _fill("\u0301", size),
        "combining_marks_sorted_badly": _fill("\u0316", size, head="a" + "\u0301" * (size // 4)),
        "tibetan_vowel_signs": _fill("\u0f73", size, head="a"),  # no combining class; NFKC: 2 marks
        "marks_beyond_the_bmp": _fill("\U0001d165\U0001d167", size, head="a"),
        "nfkc_expansion": _fill("\ufdfa", size),
        "casefold_expansion": _fill("ß", size),
        "full_width": _fill("Ａ", size),
    }
    return {name: _cap(text, size) for name, text in cases.items()}


def _cap(text: str, size: int) -> str:
    encoded = text.encode("utf-8")
    return text if len(encoded) <= size else encoded[:size].decode("utf-8", "ignore")
