"""Configuration: explicit output-topic values and TOML files whose tables cannot collide."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_learner.runtime.config import (
    AUTO,
    ConfigError,
    WorkerConfig,
    add_config_arguments,
    config_from_args,
    load_config,
    read_toml,
    to_environment,
)

# -- output topics: auto, a name, or none ------------------------------------------------------


def test_output_topics_default_to_auto_names_derived_from_the_input_and_the_group():
    config = load_config(["--topic", "mail", "--group-id", "g"], environ={})
    assert (config.predictions_topic, config.dead_letter_topic, config.models_topic) == (
        "mail.predictions",
        "mail.dlq",
        "g.models",
    )
    assert WorkerConfig(topics=("mail",), group_id="g") == config
    explicit = load_config(
        [
            "--topic",
            "mail",
            "--group-id",
            "g",
            "--predictions-topic",
            AUTO,
            "--models-topic",
            "auto",
        ],
        environ={"STREAM_LEARNER_DEAD_LETTER_TOPIC": "auto"},
    )
    assert explicit == config


@pytest.mark.parametrize("off", ["none", "off", "-", "", "None", " OFF "])
def test_every_spelling_of_off_that_worked_before_still_turns_an_output_off(off):
    config = load_config(
        ["--topic", "mail", "--predictions-topic", off],
        environ={"STREAM_LEARNER_DEAD_LETTER_TOPIC": off},
    )
    assert config.predictions_topic is None and config.dead_letter_topic is None
    assert WorkerConfig(topics=("mail",), predictions_topic=None).predictions_topic is None


def test_named_output_topics_and_the_environment_round_trip():
    config = load_config(
        ["--topic", "mail", "--predictions-topic", "scores", "--dead-letter-topic", "none"],
        environ={},
    )
    assert config.predictions_topic == "scores" and config.dead_letter_topic is None
    assert config_from_args(argparse.Namespace(), environ=to_environment(config)) == config


def test_help_says_what_auto_means():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "default auto: <input>.predictions; none: off" in text
    assert "default auto: <group>.models" in text


# -- TOML: a key in two places is an error naming both -----------------------------------------


def _toml(tmp_path, text: str):
    path = tmp_path / "worker.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "first", "second"),
    [
        (
            '[kafka]\ngroup_id = "a"\n[fusion]\ngroup_id = "b"\n',
            "kafka.group_id",
            "fusion.group_id",
        ),
        ('group_id = "a"\n[kafka]\ngroup_id = "b"\n', "group_id", "kafka.group_id"),
        ("[a.b]\nwindow = 1\n[c]\nwindow = 2\n", "a.b.window", "c.window"),
        ('topic = "x"\n[in]\ntopics = ["y"]\n', "topic", "in.topics"),
        ('[kafka]\ngroup-id = "a"\ngroup_id = "b"\n', "kafka.group-id", "kafka.group_id"),
    ],
)
def test_a_key_given_in_two_places_is_an_error_naming_both(tmp_path, text, first, second):
    with pytest.raises(ConfigError) as caught:
        read_toml(_toml(tmp_path, text))
    message = str(caught.value)
    assert f"as {first} and as {second}" in message and "set twice" in message
    with pytest.raises(ConfigError, match="set twice"):
        load_config(["--config", str(_toml(tmp_path, text))], environ={})


def test_distinct_keys_in_any_tables_are_flattened(tmp_path):
    path = _toml(
        tmp_path,
        'topic = "mail"\n[kafka]\ngroup-id = "g"\n[kafka.consumer]\nmax_poll_records = 7\n'
        '[outputs]\npredictions_topic = "none"\n',
    )
    assert read_toml(path) == {
        "topics": "mail",
        "group_id": "g",
        "max_poll_records": 7,
        "predictions_topic": "none",
    }
    config = load_config(["--config", str(path)], environ={})
    assert (
        config.topics == ("mail",) and config.group_id == "g" and config.predictions_topic is None
    )


def test_an_unknown_key_is_named_where_it_was_written(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) in .*: kafka\.grup_id"):
        read_toml(_toml(tmp_path, '[kafka]\ngrup_id = "g"\n'))


_KEYS = st.sampled_from(["group_id", "window", "seed", "client_id", "max_poll_records"])
_TABLES = st.sampled_from(["", "kafka", "learning", "a.b"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_TABLES, _KEYS, st.integers(1, 99)), min_size=1, max_size=6))
def test_any_layout_either_loads_every_key_once_or_names_the_repeat(tmp_path_factory, entries):
    tables: dict[str, dict[str, int]] = {}
    for table, key, value in entries:
        tables.setdefault(table, {})[key] = value  # TOML itself forbids a key twice in one table
    top = tables.pop("", {})
    lines = [f"{key} = {value}" for key, value in top.items()]
    for table, keys in tables.items():
        lines += [f"[{table}]", *(f"{key} = {value}" for key, value in keys.items())]
    path = tmp_path_factory.mktemp("toml") / "worker.toml"
    path.write_text("\n".join(lines) + "\n")
    placed: dict[str, list[int]] = {}
    for keys in (top, *tables.values()):
        for key, value in keys.items():
            placed.setdefault(key, []).append(value)
    if any(len(values) > 1 for values in placed.values()):
        with pytest.raises(ConfigError, match="set twice"):
            read_toml(path)
    else:
        assert read_toml(path) == {key: values[0] for key, values in placed.items()}
