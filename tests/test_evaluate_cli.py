"""`stream-learner evaluate` end to end on a user file: table, report, plot, warm start."""

import json

import pytest
from synthetic import topic_stream

from stream_learner.cli import main
from stream_learner.records import Decoder


def _write(path, records):
    decoder = Decoder()
    with open(path, "wb") as out:
        for record in records:
            out.write(decoder.encode(record) + b"\n")
    return path


@pytest.fixture
def stream_file(tmp_path):
    return _write(tmp_path / "stream.jsonl", topic_stream(1500, seed=4, permute_at=1000, noise=0.0))


def test_evaluate_writes_leaderboard_report_and_plot(stream_file, tmp_path, capsys):
    report, plot = tmp_path / "out.md", tmp_path / "out.png"
    code = main(
        ["evaluate", str(stream_file), "-m", "nb", "-m", "neural", "--serving", "ensemble",
         "--drift", "adwin", "--drift-reaction", "reset", "--report", str(report), "--plot", str(plot),
         "--no-progress"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "served (ensemble)" in out and "1,500 records" in out
    assert "drift: " in out  # the planted change at record 1000 is found
    text = report.read_text()
    assert "| learner |" in text and "## Drift events" in text and "out.png" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_delayed_labels_option_joins_every_label(stream_file, capsys):
    assert main(["evaluate", str(stream_file), "-m", "nb", "--labels-delay", "25", "--no-progress"]) == 0
    assert "delayed labels: joined 1,500, unmatched 0" in capsys.readouterr().out


def test_warm_start_from_a_saved_model(tmp_path, capsys):
    first = _write(tmp_path / "first.jsonl", topic_stream(1000, seed=4))
    later = _write(tmp_path / "later.jsonl", topic_stream(300, seed=5))
    models = tmp_path / "models"
    assert main(["evaluate", str(first), "-m", "neural", "--save-models", str(models), "--no-progress", "--drift", "none"]) == 0
    saved = models / "neural.npz"
    assert saved.exists()
    # Trained on users' texts: private to its owner.
    assert saved.stat().st_mode & 0o777 == 0o600 and models.stat().st_mode & 0o777 == 0o700
    capsys.readouterr()
    assert main(["evaluate", str(later), "-m", str(saved), "-m", "neural", "--no-progress", "--drift", "none"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    warm, cold = float(rows[str(saved)][2]), float(rows["neural"][2])
    assert warm > cold  # it already knew the topics: no cold start


def test_bad_inputs_are_refused_with_a_reason(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine", "label": "a"}) + "\n" + "{not json\n")
    assert main(["evaluate", str(bad), "-m", "nb", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: invalid_json" in err
    assert main(["evaluate", str(bad), "-m", "no-such-learner", "--no-progress"]) == 2
    assert "unknown learner" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.npz"), "-m", "nb", "--no-progress"]) == 2
