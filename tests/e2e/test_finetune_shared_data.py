"""bert-finetune on the shared data from fresh demo exports (the real commands as subprocesses).

A 30-step demo pre-training (python -m pretrain.demo, English WordPiece / Japanese
SentencePiece) is exported, then fine-tuned on small slices of SST-2, NCBI-disease and
livedoor news, and on (title, body) pairs of livedoor articles for the sentence-pair path.
Oracles: the majority-class accuracy of each dev slice (classification must beat it by the
margin each test states) and the all-"O" tagger (entity F1 0; NER must clear a stated F1).
The margins were set from runs of these exact settings with several seeds on a loaded 2-core
machine, with room below the lowest measured score; the numbers are in each docstring.

Skipped, with the reason shown, when ../shared/data is absent.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED}"),
]
# One thread per process: the machine has 2 cores, and a second OpenMP thread in a busy
# process mostly waits at barriers (docs/design.md, testing).
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run(argv: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *argv],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def demo_export(tmp_path_factory, lang: str) -> Path:
    out = tmp_path_factory.mktemp(f"demo_{lang}") / "run"
    proc = run(
        [
            "-m",
            "pretrain.demo",
            "--lang",
            lang,
            "--out",
            str(out),
            "train.steps=30",
            "train.eval_every=30",
            "train.precision=fp32",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "hf"


@pytest.fixture(scope="module")
def export_en(tmp_path_factory) -> Path:
    return demo_export(tmp_path_factory, "en")


@pytest.fixture(scope="module")
def export_ja(tmp_path_factory) -> Path:
    return demo_export(tmp_path_factory, "ja")


def finetune(model: Path, out: Path, *args: str) -> dict:
    """Run bert-finetune; return its JSON report (the last stdout line)."""
    proc = run(
        [
            "-m",
            "pretrain.finetune.cli",
            "--model",
            str(model),
            "--out",
            str(out),
            "--no-progress",
            *args,
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(report["dev"]))  # visible with -s: what the thresholds are checked against
    return report


def livedoor_articles() -> dict[str, list[dict]]:
    """Articles by category, in a fixed shuffled order (sorted by id, then seeded shuffle)."""
    by_category: dict[str, list[dict]] = {}
    with gzip.open(SHARED / "livedoor-news" / "articles.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            article = json.loads(line)
            by_category.setdefault(article["category"], []).append(article)
    rng = random.Random(0)
    for articles in by_category.values():
        articles.sort(key=lambda a: a["id"])
        rng.shuffle(articles)
    return dict(sorted(by_category.items()))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return path


def test_sst2_beats_majority(export_en, tmp_path):
    """SST-2: 3,000 train sentences drawn from train.tsv.gz (--max-train-examples), 2 epochs,
    scored on the full dev set (872).

    Majority class: 0.509 of dev. Measured 0.725 and 0.742 (seeds 42, 1); required: majority
    + 0.10. A shorter run is not safe: from this nearly untrained model the loss sits at ln 2
    for 100-200 steps before it drops (4,000 sentences x 1 epoch: 0.51-0.71 across seeds).
    """
    sst2 = SHARED / "sst2"
    report = finetune(
        export_en,
        tmp_path / "out",
        "--task",
        "classify",
        "--train",
        str(sst2 / "train.tsv.gz"),
        "--dev",
        str(sst2 / "dev.tsv"),
        "--test",
        str(sst2 / "test_unlabeled.tsv"),
        "--max-train-examples",
        "3000",
        "--epochs",
        "2",
        "--lr",
        "1e-3",
        "--batch-size",
        "16",
        "--max-length",
        "48",
    )
    dev = report["dev"]
    assert dev["examples"] == 872
    assert dev["accuracy"] >= dev["majority_baseline"] + 0.10, dev
    assert report["test"] == {"examples": 1821, "labelled": False}
    assert (tmp_path / "out" / "test_predictions.jsonl").read_text().count("\n") == 1821


def test_ncbi_disease_finds_entities(export_en, tmp_path):
    """NCBI-disease NER: 1,500 train sentences (of 5,424), the first 400 devel sentences.

    Tagging everything "O" scores entity F1 0. From this 30-step model the tagger first sits on
    all-"O" and leaves it somewhere in the first two epochs. The demo's WordPiece vocabulary
    differs between runs (huggingface/tokenizers#1794: ties broken in hash-map order), so each
    run fine-tunes a slightly different model: with 2 epochs one CI run ended still on all-"O"
    (F1 0) and one run here at 0.068, so the test runs 3. Measured here on one export with 2 / 3
    epochs, fine-tuning seeds 42, 1, 2: 0.23, 0.17, 0.23 / 0.25, 0.25, 0.27; 3 epochs on fresh
    exports: 0.27, 0.29, 0.24; required: strict entity F1 >= 0.10.
    """
    conll = SHARED / "ncbi-disease" / "conll"
    dev_lines = (conll / "devel.tsv").read_text(encoding="utf-8").split("\n\n")[:400]
    dev = tmp_path / "devel400.tsv"
    dev.write_text("\n\n".join(dev_lines) + "\n", encoding="utf-8")
    report = finetune(
        export_en,
        tmp_path / "out",
        "--task",
        "ner",
        "--train",
        str(conll / "train.tsv"),
        "--dev",
        str(dev),
        "--test",
        str(dev),
        "--max-train-examples",
        "1500",
        "--epochs",
        "3",
        "--lr",
        "2e-3",
        "--batch-size",
        "16",
        "--max-length",
        "96",
    )
    result = report["dev"]
    assert result["examples"] == 400 and result["gold_entities"] > 300
    assert result["f1"] >= 0.10, result
    assert report["test"]["f1"] == result["f1"]  # same file, scored again with the best weights
    lines = (tmp_path / "out" / "test_predictions.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 400 and len(first["tokens"]) == len(first["predicted"])


def livedoor_split(per_category_train: int, per_category_dev: int):
    """(category, article) lists for train and dev, disjoint, balanced over the 9 categories."""
    train, dev = [], []
    for category, articles in livedoor_articles().items():
        train += [(category, a) for a in articles[:per_category_train]]
        dev += [(category, a) for a in articles[per_category_train:][:per_category_dev]]
    random.Random(1).shuffle(train)
    return train, dev


def test_livedoor_nine_categories_beat_majority(export_ja, tmp_path):
    """livedoor news, 9 categories: 100 train / 30 dev articles per category.

    The text is the title and the first 300 characters of the body, cut to 64 sub-words (the
    demo's 2,000-piece SentencePiece vocabulary, trained on Akutagawa, splits news text into
    near single characters, 12% of them unknown). Majority class of the balanced dev slice:
    1/9 = 0.111. Measured after these 6 epochs: 0.43, 0.44, 0.39 (seeds 1, 2, 42; 0.41-0.46
    after 8; ~0.17 at lr 3e-3, which stalls); required: majority + 0.15.
    """
    train, dev = livedoor_split(100, 30)

    def rows(items):
        return [{"text": a["title"] + "。" + a["body"][:300], "category": c} for c, a in items]

    report = finetune(
        export_ja,
        tmp_path / "out",
        "--task",
        "classify",
        "--train",
        str(write_jsonl(tmp_path / "train.jsonl", rows(train))),
        "--dev",
        str(write_jsonl(tmp_path / "dev.jsonl", rows(dev))),
        "--label-column",
        "category",
        "--epochs",
        "6",
        "--lr",
        "5e-4",
        "--batch-size",
        "16",
        "--max-length",
        "64",
        "--patience",
        "3",
    )
    result = report["dev"]
    assert result["examples"] == 270
    assert result["accuracy"] >= result["majority_baseline"] + 0.15, result


def test_livedoor_title_body_pairs_beat_majority(export_ja, tmp_path):
    """The sentence-pair path on real text: text = an article's title, text_b = the opening of
    its body (segment 1, truncated longest-first to 64 sub-words together), label = category;
    60 train / 30 dev articles per category.

    Why not next-sentence vs random-sentence pairs: measured here, a 30-step demo model stays
    at chance on them within a test's CPU budget (livedoor, 2,300 pairs x 4 epochs: dev 0.52;
    Gutenberg, 7,800 pairs: 0.50, loss flat at ln 2; a synthetic keyword-match pair task: 0.50),
    so such a test could not tell a broken pair path from a weak model. Majority class 0.111.
    Measured after these 6 epochs: 0.28, 0.27, 0.31 (seeds 1, 2, 42); required: majority + 0.10.
    """
    train, dev = livedoor_split(60, 30)

    def rows(items):
        return [{"title": a["title"], "body": a["body"][:300], "label": c} for c, a in items]

    report = finetune(
        export_ja,
        tmp_path / "out",
        "--task",
        "pair",
        "--train",
        str(write_jsonl(tmp_path / "train.jsonl", rows(train))),
        "--dev",
        str(write_jsonl(tmp_path / "dev.jsonl", rows(dev))),
        "--text-column",
        "title",
        "--text-b-column",
        "body",
        "--epochs",
        "6",
        "--lr",
        "5e-4",
        "--batch-size",
        "16",
        "--max-length",
        "64",
        "--patience",
        "3",
    )
    result = report["dev"]
    assert result["examples"] == 270
    assert result["accuracy"] >= result["majority_baseline"] + 0.10, result
