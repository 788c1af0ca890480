"""`stream-learner produce`: field names mapped end to end through the broker to `run`, bad
lines skipped and counted, pass-through, and the summary it always ends with."""

from __future__ import annotations

import csv
import json

import pytest
from kafka_helpers import KEY, read_topic

from stream_learner.cli.main import main
from stream_learner.io.broker import create_topics
from stream_learner.runtime.config import load_config
from stream_learner.runtime.worker import run_worker

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

FIELDS = ["--text-field", "body", "--label-field", "verdict", "--id-field", "msg", "--ts-field", "sent"]


def write_csv(path, rows):
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=["msg", "body", "verdict", "sent"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def rows(n):
    return [
        {"msg": f"m{i}", "body": ("cheap pills now" if i % 2 else "team meeting notes"), "verdict": ("spam" if i % 2 else "ham"), "sent": str(1_700_000_000 + i)}
        for i in range(n)
    ]


def test_field_names_reach_the_worker_through_the_broker(kafka_broker, kafka_names, tmp_path, capsys, monkeypatch):
    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 1, f"{topic}.predictions": 1, f"{topic}.dlq": 1})
    source = write_csv(tmp_path / "mail.csv", rows(200))
    code = main(["produce", str(source), "--topic", topic, "--bootstrap-servers", kafka_broker.bootstrap_servers, *FIELDS])
    assert code == 0
    assert "sent 200 messages" in capsys.readouterr().out
    sent = read_topic(kafka_broker.bootstrap_servers, topic, expected=200)
    assert set(json.loads(sent[0].value)) == {"msg", "body", "verdict", "sent"}  # the file's own names

    monkeypatch.setenv("STREAM_LEARNER_CHECKPOINT_KEY", KEY)
    config = load_config(
        ["--topic", topic, "--bootstrap-servers", kafka_broker.bootstrap_servers, "--group-id", f"{kafka_names}-g",
         "--checkpoint-dir", str(tmp_path / "ckpt"), "--session-timeout-ms", "3000", "--stop-when-idle", "3", "--learners", "nb", *FIELDS],
        environ={"STREAM_LEARNER_CHECKPOINT_KEY": KEY},
    )  # fmt: skip
    captured = {}
    assert run_worker(config, on_ready=lambda worker: captured.setdefault("worker", worker)) == 0
    summary = captured["worker"].summary()
    assert summary["learned"] == 200
    predictions = [json.loads(m.value) for m in read_topic(kafka_broker.bootstrap_servers, f"{topic}.predictions", expected=200)]
    assert sorted(p["id"] for p in predictions) == sorted(f"m{i}" for i in range(200))
    assert read_topic(kafka_broker.bootstrap_servers, f"{topic}.dlq", timeout=3) == []


def test_bad_lines_are_skipped_counted_and_reported(kafka_broker, kafka_names, tmp_path, capsys):
    topic = f"{kafka_names}-in"
    lines = [json.dumps({"id": f"r{i}", "text": "words here", "label": "a"}) for i in range(10)]
    lines[3] = json.dumps({"id": "r3", "text": ""})
    lines[6] = "{not json"
    lines[8] = json.dumps({"id": "r8", "text": "   "})
    source = tmp_path / "mixed.jsonl"
    source.write_text("\n".join(lines) + "\n")
    assert main(["produce", str(source), "--topic", topic, "--bootstrap-servers", kafka_broker.bootstrap_servers]) == 0
    out = capsys.readouterr().out
    assert "sent 7 messages" in out
    assert "skipped 3 lines that are not records (empty_text 2, invalid_json 1)" in out
    assert len(read_topic(kafka_broker.bootstrap_servers, topic, expected=7)) == 7


def test_on_error_stop_stops_at_the_first_bad_line_and_says_what_was_sent(kafka_broker, kafka_names, tmp_path, capsys):
    topic = f"{kafka_names}-in"
    lines = [json.dumps({"id": f"r{i}", "text": "words", "label": "a"}) for i in range(10)]
    lines[5] = json.dumps({"id": "r5", "text": ""})
    source = tmp_path / "stop.jsonl"
    source.write_text("\n".join(lines) + "\n")
    code = main(["produce", str(source), "--topic", topic, "--bootstrap-servers", kafka_broker.bootstrap_servers, "--on-error", "stop"])
    assert code == 2
    out = capsys.readouterr().out
    assert "sent 5 messages" in out and "empty_text 1" in out


def test_pass_through_sends_lines_unchanged(kafka_broker, kafka_names, tmp_path, capsys):
    topic = f"{kafka_names}-in"
    lines = [b'{"text": "kept as is",   "extra": 1}', b"plain words", b'{"text": ""}']
    source = tmp_path / "raw.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    code = main(["produce", str(source), "--topic", topic, "--bootstrap-servers", kafka_broker.bootstrap_servers, "--pass-through"])
    assert code == 0
    assert "sent 3 messages" in capsys.readouterr().out
    assert sorted(m.value for m in read_topic(kafka_broker.bootstrap_servers, topic, expected=3)) == sorted(lines)


def test_a_missing_topic_option_is_one_clear_line(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("STREAM_LEARNER_TOPIC", raising=False)
    source = tmp_path / "one.jsonl"
    source.write_text('{"text": "x"}\n')
    assert main(["produce", str(source)]) == 2
    assert [r.getMessage() for r in caplog.records] == ["name the topic to send to with --topic (or $STREAM_LEARNER_TOPIC)"]
