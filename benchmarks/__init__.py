"""Benchmarks: figures measured against named anchors in the same run (see results/)."""
