"""stream-learner: online learning on text streams."""

__version__ = "0.1.0"
