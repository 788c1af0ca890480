"""`stream-learner evaluate` end to end on a user file: table, report, plot, warm start."""

import json

import pytest
from synthetic import topic_stream

from stream_learner.cli.main import main
from stream_learner.core.records import Decoder


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
        ["evaluate", str(stream_file), "--learners", "nb", "--learners", "neural", "--serving", "ensemble",
         "--drift-detector", "adwin", "--drift-reaction", "reset", "--report", str(report), "--plot", str(plot),
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
    assert main(["evaluate", str(stream_file), "--learners", "nb", "--labels-delay", "25", "--no-progress"]) == 0
    assert "delayed labels: joined 1,500, unmatched 0" in capsys.readouterr().out


def test_warm_start_from_a_saved_model(tmp_path, capsys):
    first = _write(tmp_path / "first.jsonl", topic_stream(1000, seed=4))
    later = _write(tmp_path / "later.jsonl", topic_stream(300, seed=5))
    models = tmp_path / "models"
    assert main(["evaluate", str(first), "--learners", "neural", "--save-models", str(models), "--no-progress", "--drift-detector", "none"]) == 0
    saved = models / "neural.npz"
    assert saved.exists()
    # Trained on users' texts: private to its owner.
    assert saved.stat().st_mode & 0o777 == 0o600 and models.stat().st_mode & 0o777 == 0o700
    capsys.readouterr()
    assert main(["evaluate", str(later), "--learners", str(saved), "--learners", "neural", "--no-progress", "--drift-detector", "none"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    warm, cold = float(rows[str(saved)][2]), float(rows["neural"][2])
    assert warm > cold  # it already knew the topics: no cold start


def test_bad_inputs_are_refused_with_a_reason(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine", "label": "a"}) + "\n" + "{not json\n")
    assert main(["evaluate", str(bad), "--learners", "nb", "--no-progress", "--on-error", "stop"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: invalid_json" in err
    assert main(["evaluate", str(bad), "--learners", "nb", "--no-progress"]) == 0
    assert "bad.jsonl:2: invalid_json" in capsys.readouterr().out
    assert main(["evaluate", str(bad), "--learners", "no-such-learner", "--no-progress"]) == 2
    assert "unknown learner" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.npz"), "--learners", "nb", "--no-progress"]) == 2


def _lines(path, lines):
    path.write_text("".join(json.dumps(obj) + "\n" for obj in lines))
    return path


def _messy(tmp_path):
    good = [{"text": f"{'good great' if i % 2 else 'bad awful'} words {i}", "label": "ab"[i % 2]} for i in range(60)]
    bad = [
        {"text": "   ", "label": "a"},
        {"text": "", "label": "b"},
        {"text": "x" * 70_000 + " good", "label": "b"},
        {"text": "bad words", "label": "a", "ts": "2016/12/30 7:11"},
        {"text": "good words", "label": "b", "ts": "sometime"},
    ]
    return _lines(tmp_path / "messy.jsonl", good[:30] + bad + good[30:])


def test_evaluate_skips_and_counts_what_it_cannot_use_and_goes_on(tmp_path, capsys):
    report = tmp_path / "report.md"
    code = main(["evaluate", str(_messy(tmp_path)), "--learners", "nb", "--no-progress", "--report", str(report)])
    assert code == 0
    out = capsys.readouterr().out
    assert "63 records" in out  # 60 good, the truncated one, both with odd timestamps
    assert "skipped 2 records the decoder refused (empty_text 2)" in out
    assert "truncated 1 texts" in out and "dropped 1 timestamps" in out
    assert "skipped 2 records" in report.read_text()


def test_evaluate_can_still_stop_at_the_first_bad_record(tmp_path, capsys):
    messy = _messy(tmp_path)
    assert main(["evaluate", str(messy), "--learners", "nb", "--no-progress", "--on-error", "stop"]) == 2
    assert "messy.jsonl:31: empty_text" in capsys.readouterr().err
    code = main(["evaluate", str(messy), "--learners", "nb", "--no-progress", "--on-oversize", "stop"])
    assert code == 2 and "text_too_long" in capsys.readouterr().err
    code = main(["evaluate", str(messy), "--learners", "nb", "--no-progress", "--on-oversize", "skip"])
    out = capsys.readouterr().out
    assert code == 0 and "62 records" in out and "text_too_long 1" in out


def test_evaluate_takes_the_text_limit_the_worker_takes(tmp_path, capsys):
    messy = _messy(tmp_path)
    # The 70 KB text fits a 100 KiB limit: nothing is truncated.
    assert main(["evaluate", str(messy), "--learners", "nb", "--no-progress", "--max-text-bytes", "100KiB"]) == 0
    out = capsys.readouterr().out
    assert "63 records" in out and "truncated" not in out
    # At 32 bytes each of the 60 good texts fits; the long one is cut.
    code = main(["evaluate", str(messy), "--learners", "nb", "--no-progress", "--max-text-bytes", "32", "--report", str(tmp_path / "r.md")])
    assert code == 0 and "truncated 1 texts" in capsys.readouterr().out
    assert "--max-text-bytes 32" in (tmp_path / "r.md").read_text()  # the rerun command keeps it


def test_evaluate_says_plainly_when_nothing_could_be_scored(tmp_path, capsys):
    stream = _lines(tmp_path / "s.jsonl", [{"body": "some words", "sentiment": "pos", "id": i} for i in range(5)])
    assert main(["evaluate", str(stream), "--learners", "nb", "--no-progress", "--text-field", "body"]) == 1
    err = capsys.readouterr().err
    assert "no record could be scored" in err and "'label'" in err
    assert "fields seen: body, sentiment, id" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["evaluate", str(empty), "--learners", "nb", "--no-progress"]) == 1
    assert "holds no records" in capsys.readouterr().err
    blanks = _lines(tmp_path / "blank.jsonl", [{"text": " ", "label": "a"}] * 3)
    assert main(["evaluate", str(blanks), "--learners", "nb", "--no-progress"]) == 1
    assert "every one of the 3 rows" in capsys.readouterr().err


def test_evaluate_without_a_model_serves_the_default_learner(stream_file, capsys):
    from stream_learner.cli.evaluate import DEFAULT_LEARNERS
    from stream_learner.runtime.config import WorkerConfig

    assert main(["evaluate", str(stream_file), "--no-progress", "--limit", "300"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[2:3]] == list(DEFAULT_LEARNERS) == ["neural"]
    assert WorkerConfig(topics=("t",)).learners == DEFAULT_LEARNERS  # `run` serves the same


def test_the_progress_line_counts_what_was_skipped_truncated_and_dropped(tmp_path):
    from stream_learner.cli.evaluate import InputProblems, _RichProgress
    from stream_learner.core.processor import StreamProcessor
    from stream_learner.data.readers import iter_records

    problems = InputProblems()
    records = problems.watch(
        iter_records(_messy(tmp_path), on_error="skip", on_skip=problems.skip, oversize="truncate", on_truncate=problems.truncate)
    )
    processor = StreamProcessor(["nb"])
    for record in records:
        processor.process(record)
    assert problems.short() == "skipped 2  truncated 1  ts dropped 1"
    bar = _RichProgress(total=None, problems=problems)
    bar(63, 1.0, processor)
    assert bar._progress.tasks[0].fields["problems"] == "skipped 2  truncated 1  ts dropped 1"
