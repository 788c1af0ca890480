"""`make demo` runs `stream-learner demo`: the whole job on an embedded broker, then stops."""

import subprocess
import sys

import pytest


@pytest.mark.kafka
def test_demo_streams_through_the_broker_and_cleans_up(fetched_dataset, tmp_path):
    fetched_dataset("vader")
    done = subprocess.run(
        [sys.executable, "-m", "stream_learner.cli.main", "demo", "--limit", "1500",
         "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "1,500 records" in out and "0 dead letters" in out
    assert "neural" in out and "nb" in out  # both learners in the summary table
    assert (tmp_path / "out" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "stopped the broker" in out
