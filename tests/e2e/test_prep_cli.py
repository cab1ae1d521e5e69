"""`python -m data_prep` as a user runs it: tokenizer → encode → verify → merge, and errors.

Each step is a real subprocess, so exit codes, stdout/stderr and the files on disk are what a
user (or the Makefile's demo) gets.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.shard_format import IndexedDataset
from data_prep.sources import CORPUS_DIR

REPO = Path(__file__).resolve().parents[2]


def prep(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Tokenizer and dataset from ~100 KB of the built-in English corpus + the Japanese one."""
    tmp = tmp_path_factory.mktemp("cli")
    text = gzip.decompress((CORPUS_DIR / "gutenberg_excerpt.txt.gz").read_bytes())
    (tmp / "in").mkdir()
    (tmp / "in" / "en.txt.gz").write_bytes(gzip.compress(text[:100_000]))
    (tmp / "in" / "ja.txt").write_bytes((CORPUS_DIR / "akutagawa.txt").read_bytes()[:60_000])
    tok = prep(
        "tokenizer", "--input", tmp / "in", "--out", tmp / "tok", "--vocab-size", "1500", "--cased"
    )
    assert tok.returncode == 0, tok.stderr
    assert str(tmp / "tok") in tok.stdout
    enc = prep(
        "encode",
        "--input",
        tmp / "in",
        "--tokenizer",
        tmp / "tok",
        "--out",
        tmp / "data",
        "--shard-tokens",
        "20000",
    )
    assert enc.returncode == 0, enc.stderr
    assert str(tmp / "data") in enc.stdout and "too_short" in enc.stdout
    return tmp


def test_manifest_counts_equal_the_reader(dataset: Path) -> None:
    """Oracle: IndexedDataset counting from the .idx files vs what encode wrote in the
    manifest and printed."""
    manifest = json.loads((dataset / "data" / "manifest.json").read_text())
    ds = IndexedDataset(dataset / "data")
    assert manifest["num_documents"] == ds.num_documents > 0
    assert manifest["num_sentences"] == ds.num_sentences == len(ds.sentence_lengths())
    assert manifest["num_tokens"] == ds.num_tokens == int(ds.sentence_lengths().sum())
    assert manifest["stats"]["files"] == 2
    assert len(manifest["shards"]) > 1
    assert manifest["tokenizer"]["hash"] == ds.tokenizer_hash
    assert (dataset / "data" / "tokenizer" / "tokenizer.json").is_file()


def test_verify_passes_then_names_a_corrupt_shard(dataset: Path, tmp_path: Path) -> None:
    """Oracle: exit 0 on the fresh dataset; after flipping one byte in a copy, exit 1 and the
    shard's name in the output."""
    ok = prep("verify", dataset / "data")
    assert ok.returncode == 0, ok.stderr
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in (dataset / "data").iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    name = json.loads((copy / "manifest.json").read_text())["shards"][1]["name"]
    data = bytearray((copy / f"{name}.bin").read_bytes())
    data[3] ^= 0x80
    (copy / f"{name}.bin").write_bytes(bytes(data))
    bad = prep("verify", copy)
    assert bad.returncode == 1 and name in bad.stdout


def test_merge(dataset: Path, tmp_path: Path) -> None:
    """Oracle: merging a dataset with itself doubles every count; verify then passes."""
    out = tmp_path / "merged"
    res = prep("merge", dataset / "data", dataset / "data", "--out", out)
    assert res.returncode == 0, res.stderr
    merged = IndexedDataset(out)
    single = IndexedDataset(dataset / "data")
    assert merged.num_tokens == 2 * single.num_tokens
    assert prep("verify", out).returncode == 0


@pytest.mark.parametrize(
    "args",
    [
        ("encode", "--input", "{tmp}/missing.txt", "--tokenizer", "{data}/tok", "--out", "{tmp}/o"),
        ("tokenizer", "--input", "{tmp}/binary.dat", "--out", "{tmp}/t"),
        ("tokenizer", "--input", "{data}/in", "--out", "{tmp}/t", "--vocab-size", "4"),
        ("encode", "--input", "{data}/in", "--tokenizer", "{tmp}", "--out", "{tmp}/o"),
        ("verify", "{tmp}"),
        (
            "encode",
            "--input",
            "{data}/in",
            "--pattern",
            "wiki_*",
            "--tokenizer",
            "{data}/tok",
            "--out",
            "{tmp}/o",
        ),
        (
            "encode",
            "--input",
            "{data}/in",
            "--tokenizer",
            "{tmp}/other_tok",
            "--out",
            "{data}/data",
        ),
        (
            "encode",
            "--input",
            "{data}/in",
            "--tokenizer",
            "{data}/tok",
            "--out",
            "{tmp}/o",
            "--encoding",
            "utf-16",
        ),
        ("encode", "--input", "{tmp}/binary.dat", "--tokenizer", "{data}/tok", "--out", "{tmp}/o"),
        # issue 13: Shift_JIS read as UTF-8, a cut manifest, --out inside an --input directory
        (
            "encode",
            "--input",
            "{tmp}/good",
            "{tmp}/sjis.txt",
            "--tokenizer",
            "{data}/tok",
            "--out",
            "{tmp}/o",
        ),
        ("tokenizer", "--input", "{tmp}/good", "{tmp}/sjis.txt", "--out", "{tmp}/t"),
        ("verify", "{tmp}/cut"),
        (
            "encode",
            "--input",
            "{tmp}/good",
            "--tokenizer",
            "{data}/tok",
            "--out",
            "{tmp}/good/sub/o",
        ),
        ("tokenizer", "--input", "{tmp}/good", "--out", "{tmp}/good/t"),
        (
            "encode",
            "--input",
            "{tmp}/good",
            "--tokenizer",
            "{data}/tok",
            "--out",
            "{tmp}/binary.dat/o",
        ),
    ],
)
def test_user_errors_are_one_line_exit_2(dataset: Path, tmp_path: Path, args) -> None:
    """Oracle: docs/design.md: a user error exits non-zero (2) with one line and no traceback."""
    (tmp_path / "binary.dat").write_bytes(b"\0\1\2" * 100)
    (tmp_path / "sjis.txt").write_bytes((CORPUS_DIR / "akutagawa.txt").read_text().encode("cp932"))
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "en.txt.gz").write_bytes((dataset / "in" / "en.txt.gz").read_bytes())
    (tmp_path / "cut").mkdir()
    manifest = (dataset / "data" / "manifest.json").read_bytes()
    (tmp_path / "cut" / "manifest.json").write_bytes(manifest[: len(manifest) // 2])
    if "{tmp}/other_tok" in args:  # a tokenizer other than the one that made {data}/data
        other = prep(
            "tokenizer",
            "--input",
            dataset / "in",
            "--out",
            tmp_path / "other_tok",
            "--vocab-size",
            "900",
        )
        assert other.returncode == 0, other.stderr
    res = prep(*(a.format(tmp=tmp_path, data=dataset) for a in args))
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bert-prep: error: "), res.stderr


def test_help_for_every_subcommand() -> None:
    """Oracle: docs/design.md: every command has --help (exit 0, mentions its options)."""
    for sub, option in [
        ("tokenizer", "--vocab-size"),
        ("encode", "--workers"),
        ("verify", "DIR"),
        ("merge", "--out"),
    ]:
        res = prep(sub, "--help")
        assert res.returncode == 0 and option in res.stdout, res.stderr


def test_bad_inputs_are_skipped_counted_and_reported(dataset: Path, tmp_path: Path) -> None:
    """Oracle: the issue's list of bad inputs, one file each, beside one good file: the run
    succeeds, and the summary table and manifest count every loss by reason (nothing is
    dropped silently); progress lines appear on a non-terminal stderr."""
    bad = tmp_path / "bad"
    bad.mkdir()
    text = gzip.decompress((CORPUS_DIR / "gutenberg_excerpt.txt.gz").read_bytes())[:40_000]
    (bad / "good.txt").write_bytes(text)
    (bad / "binary.bin").write_bytes(b"\x7fELF\0\0" * 500)
    (bad / "empty.txt").write_bytes(b"")
    (bad / "latin1.txt").write_bytes(b"Caf\xe9 au lait is a drink.\nIt is good.\n")
    packed = gzip.compress(text * 8)
    (bad / "truncated.txt.gz").write_bytes(packed[: len(packed) // 2])
    with open(bad / "one_line.txt", "wb") as f:  # 50 MB without a newline
        for _ in range(50):
            f.write(b"word " * 209715 + b"w")
    (bad / "records.jsonl").write_text(
        '{"text": "A fine record with enough words to be kept as a document."}\n'
        "{not json\n"
        '{"title": "no text field"}\n'
    )
    res = prep(
        "encode",
        "--input",
        bad,
        "--tokenizer",
        dataset / "tok",
        "--out",
        tmp_path / "data",
        "--log-every",
        "0",
        "--max-doc-chars",
        "1000000",
    )
    assert res.returncode == 0, res.stderr
    stats = json.loads((tmp_path / "data" / "manifest.json").read_text())["stats"]
    assert stats["skipped_files"] == {"binary": 1, "empty": 1, "corrupt": 0}
    assert stats["truncated_files"] == 1
    assert stats["invalid_utf8_lines"] == 1
    assert stats["invalid_json_lines"] == 1 and stats["missing_field_records"] == 1
    assert stats["dropped"]["too_long"] == 1
    for expected in [
        "skipped: binary 1, empty 1, corrupt 0",
        "the part before the damage kept: 1",
        f"read in part {bad / 'truncated.txt.gz'}: truncated (EOFError",
        "too_long 1",
        "undecodable 1",
        "invalid JSON 1",
        "records without the text field 1",
        "peak memory",
        f"skipped {bad / 'binary.bin'}: binary",
        "tokens/s",
    ]:
        assert expected in res.stdout, (expected, res.stdout)
    assert "MB/s" in res.stderr and "docs/s" in res.stderr and "ETA" in res.stderr


def test_a_cut_manifest_is_one_line_in_bert_train(dataset: Path, tmp_path: Path) -> None:
    """Oracle: the README's promise of one-line errors: `bert-train` on a dataset whose
    manifest.json was cut (a copy, half of it) exits 2 with one error line naming the file
    (before the fix: a JSONDecodeError traceback); `bert-prep verify` says the same."""
    cut = tmp_path / "cut"
    cut.mkdir()
    manifest = (dataset / "data" / "manifest.json").read_bytes()
    (cut / "manifest.json").write_bytes(manifest[: len(manifest) // 2])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain",
            "--config",
            REPO / "configs" / "tiny.yaml",
            f"data.path={cut}",
            f"train.out_dir={tmp_path / 'run'}",
            "train.steps=1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, res.stderr
    assert errors[0].startswith(f"bert-train: error: {cut / 'manifest.json'}: not valid JSON")
    verify = prep("verify", cut)
    assert verify.returncode == 2 and verify.stderr.startswith(
        f"bert-prep: error: {cut / 'manifest.json'}: not valid JSON"
    )
