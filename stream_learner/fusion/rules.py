"""The ``--fusion`` setting: which fusion rule each learner follows. Small on purpose, so that
the configuration checks the option without importing the fusion machinery."""

from __future__ import annotations

__all__ = ["RULES", "FusionError", "parse_rules"]

RULES = ("average", "counts", "ensemble")


class FusionError(ValueError):
    """A snapshot that cannot be used (damaged, unsigned, another configuration)."""


def parse_rules(text: str | None) -> dict[str, str] | None:
    """``--fusion`` → None (off) or ``{learner: rule}`` overrides (``{}``: every learner, by
    its default rule). ``none`` as a rule leaves that learner out.

    >>> parse_rules("on"), parse_rules("off"), parse_rules("neural=average, softmax=none")
    ({}, None, {'neural': 'average', 'softmax': 'none'})
    >>> parse_rules("nb=mean")
    Traceback (most recent call last):
    ...
    stream_learner.fusion.rules.FusionError: unknown fusion rule 'mean' for nb; rules: average, counts, ensemble, none
    """
    if text is None or text.strip().lower() in ("", "off", "none", "false", "0"):
        return None
    if text.strip().lower() in ("on", "auto", "true", "1"):
        return {}
    rules = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, rule = item.partition("=")
        name, rule = name.strip(), rule.strip().lower()
        if not sep or not name:
            raise FusionError(f"fusion setting {item.strip()!r} is not LEARNER=RULE (or on / off)")
        if rule not in (*RULES, "none"):
            raise FusionError(
                f"unknown fusion rule {rule!r} for {name}; rules: {', '.join(RULES)}, none"
            )
        rules[name] = rule
    return rules
