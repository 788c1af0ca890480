"""What users read: every command's help says what each option does and its default once,
in plain text; the old evaluate spellings still work and say what replaces them."""

from __future__ import annotations

import argparse
import re
import shlex

import pytest
from synthetic import topic_stream

from stream_learner.cli.evaluate import record_total
from stream_learner.cli.main import build_parser, main
from stream_learner.core.records import Decoder


def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_help_reads_as_plain_text_with_each_default_once(name):
    parser = subcommands()[name]
    text = parser.format_help()
    assert parser.description, f"{name} --help has no description"
    assert "``" not in text and "default None" not in text and "default required" not in text
    for action in parser._actions:
        if action.option_strings and action.help != argparse.SUPPRESS and action.dest != "help":
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            assert len(re.findall(r"\bdefault\b", action.help.replace("%(default)s", "X"))) <= 1, f"{name} {action.option_strings[0]}: {action.help}"


def test_version(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    assert re.fullmatch(r"stream-learner \S+\n", capsys.readouterr().out)


def write_stream(path, n=600):
    decoder = Decoder(text_field="body", label_field="y")
    with open(path, "wb") as out:
        for record in topic_stream(n, seed=2):
            out.write(decoder.encode(record) + b"\n")
    return path


def table(output: str) -> str:
    return output.split("\n\n")[0]


def test_the_reports_command_line_reruns_to_the_same_table(tmp_path, capsys):
    source = write_stream(tmp_path / "s.jsonl")
    report = tmp_path / "r.md"
    argv = ["evaluate", str(source), "--learners", "nb,pa", "--serving", "ensemble", "--text-field", "body",
            "--label-field", "y", "--labels-delay", "30", "--window", "200", "--no-progress", "--report", str(report)]  # fmt: skip
    assert main(argv) == 0
    first = table(capsys.readouterr().out)
    command = re.search(r"Command: `([^`]+)`", report.read_text()).group(1)
    words = shlex.split(command)
    assert words[:2] == ["stream-learner", "evaluate"]
    for option in ("--text-field body", "--label-field y", "--labels-delay 30", "--window 200", "--learners nb,pa"):
        assert option in command
    assert main([*words[1:], "--no-progress"]) == 0
    assert table(capsys.readouterr().out) == first


def test_old_spellings_still_work_and_name_their_replacement(tmp_path, capsys):
    source = write_stream(tmp_path / "s.jsonl", n=200)
    code = main(["evaluate", str(source), "-m", "nb", "--model", "pa", "--drift", "none", "--text-field", "body",
                 "--label-field", "y", "--no-progress"])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    assert "-m is deprecated; use --learners" in captured.err
    assert "--drift is deprecated; use --drift-detector" in captured.err
    assert {line.split()[0] for line in table(captured.out).splitlines()[2:]} >= {"nb", "pa"}


def test_nothing_scored_reads_n_a_and_the_total_is_known_for_line_files(tmp_path):
    from stream_learner.cli.report import format_table

    text = format_table([{"learner": "nb", "n": 0, "accuracy": 0.0, "rolling_accuracy": 0.0}])
    assert "n/a" in text and "0.0000" not in text
    source = write_stream(tmp_path / "s.jsonl", n=120)
    assert record_total(str(source), None, None) == 120
    assert record_total(str(source), None, 50) == 50
    assert all(len(line) <= 80 for line in text.splitlines()[:-1])
