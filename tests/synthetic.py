"""Small synthetic text streams with known structure, for tests."""

import random

from stream_learner.core.records import Record

TOPICS = {
    "sports": [
        "goal",
        "match",
        "team",
        "score",
        "league",
        "coach",
        "player",
        "season",
        "win",
        "stadium",
    ],
    "tech": [
        "software",
        "chip",
        "laptop",
        "code",
        "cloud",
        "startup",
        "app",
        "network",
        "data",
        "robot",
    ],
    "food": [
        "recipe",
        "pasta",
        "bake",
        "sugar",
        "flavor",
        "dinner",
        "cheese",
        "spicy",
        "soup",
        "kitchen",
    ],
}
FILLER = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "it",
    "that",
    "on",
    "for",
    "with",
    "as",
    "this",
    "was",
    "at",
    "by",
]


def topic_stream(n, *, seed=0, permute_at=None, noise=0.1, classes=("sports", "tech", "food")):
    """Records whose label is the topic of their words; after ``permute_at`` the labels are
    rotated (sports→tech→food→sports): a planted concept drift."""
    rng = random.Random(seed)
    rotated = {c: classes[(i + 1) % len(classes)] for i, c in enumerate(classes)}
    for i in range(n):
        topic = rng.choice(classes)
        words = [rng.choice(TOPICS[topic]) for _ in range(rng.randint(3, 7))]
        words += [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
        rng.shuffle(words)
        label = topic
        if rng.random() < noise:
            label = rng.choice(classes)
        if permute_at is not None and i >= permute_at:
            label = rotated[label]
        yield Record(id=f"r{i}", text=" ".join(words), label=label, ts=1_700_000_000.0 + i)
