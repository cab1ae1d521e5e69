"""bert-finetune on tiny random exports (no shared data, no pre-training): seconds per test.

Oracles: synthetic tasks whose answer is a keyword (a model that learned anything scores near
1, chance is 0.5); `transformers` reloading the saved model and reproducing the predictions the
run wrote; two independent sub-word alignments (fast tokenizer's word_ids() vs word-by-word
tokenisation) agreeing; and the CLI contract for user errors (exit 2, one line, no traceback).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_prep.tokenizer import train_tokenizer
from pretrain import export_hf
from pretrain.config import ModelShape
from pretrain.finetune import cli, tasks
from pretrain.finetune.data import TokenExample
from pretrain.model import build_model

transformers = pytest.importorskip("transformers")

POSITIVE = ["good", "great", "wonderful", "happy"]
NEGATIVE = ["bad", "awful", "terrible", "sad"]
FILLER = "the a man woman house time day night old young little great very said went came".split()


def make_export(tokenizer_dir: Path, out: Path, norm: str = "post", seed: int = 0) -> Path:
    """A randomly initialised 1-layer export (hidden 32) written by our export code."""
    info = json.loads((tokenizer_dir / "bert_tokenizer.json").read_text(encoding="utf-8"))
    shape = ModelShape(
        layers=1,
        hidden=32,
        heads=2,
        ffn_hidden=64,
        vocab_size=info["vocab_size"],
        max_seq_len=64,
        norm=norm,
        dropout=0.0,
        pair_head=False,
    )
    torch.manual_seed(seed)
    out.mkdir(parents=True)
    export_hf.write_hf_model(build_model(shape), out)
    for name in export_hf.TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / name)
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["model_max_length"] = shape.max_seq_len
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(small_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft_tok") / "tokenizer"
    train_tokenizer([small_corpus], out, "wordpiece", 1000, lang="en")
    return out


@pytest.fixture(scope="module")
def export(tokenizer_dir, tmp_path_factory) -> Path:
    return make_export(tokenizer_dir, tmp_path_factory.mktemp("ft_export") / "hf")


def keyword_rows(n: int, seed: int) -> list[dict]:
    """Sentences of filler words with one sentiment word; the label is that word's side."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.choices(FILLER, k=rng.randint(3, 8))
        words.insert(
            rng.randint(0, len(words)), rng.choice(POSITIVE if label == "pos" else NEGATIVE)
        )
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_tsv(path: Path, rows: list[dict], columns=("text", "label")) -> Path:
    lines = ["\t".join(columns)] + ["\t".join(r[c] for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ner_rows(n: int, seed: int) -> list[dict]:
    """Disease names from a fixed list (B-Disease, and I-Disease for a following 'syndrome')."""
    rng = random.Random(seed)
    names = ["cancer", "ataxia", "anemia", "asthma"]
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(4, 10)):
            if rng.random() < 0.2:
                tokens.append(rng.choice(names))
                tags.append("B-Disease")
                if rng.random() < 0.5:
                    tokens.append("syndrome")
                    tags.append("I-Disease")
            else:
                tokens.append(rng.choice(FILLER))
                tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def write_conll(path: Path, rows: list[dict]) -> Path:
    blocks = [
        "\n".join(f"{t}\t{g}" for t, g in zip(r["tokens"], r["tags"], strict=True)) for r in rows
    ]
    path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main([*argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_classify_learns_a_keyword_task_and_saves_a_model_transformers_reloads(
    export, tmp_path, capsys
):
    """Dev accuracy > 0.9 (chance 0.5); the saved model reproduces test_predictions.jsonl."""
    train = write_tsv(tmp_path / "train.tsv", keyword_rows(400, 0))
    dev = write_tsv(tmp_path / "dev.tsv", keyword_rows(100, 1))
    test_rows = keyword_rows(50, 2)
    test = write_tsv(tmp_path / "test.tsv", test_rows, columns=("text",))  # unlabelled
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        [
            "--model",
            str(export),
            "--task",
            "classify",
            "--train",
            str(train),
            "--dev",
            str(dev),
            "--test",
            str(test),
            "--epochs",
            "6",
            "--lr",
            "3e-3",
            "--batch-size",
            "16",
            "--out",
            str(out),
            "--seed",
            "3",
        ],
        capsys,
    )
    assert code == 0, stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["dev"]["accuracy"] > 0.9, report
    assert report["dev"]["majority_baseline"] < 0.65
    assert report["test"] == {"examples": 50, "labelled": False}
    assert "accuracy" in stdout.splitlines()[0]  # the readable table comes first
    assert "BertForSequenceClassification" in stderr

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["dev"] == report["dev"] and saved["options"]["seed"] == 3
    assert (out / "model.safetensors").is_file()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    written = [json.loads(line) for line in (out / "test_predictions.jsonl").open()]
    with torch.no_grad():
        batch = tokenizer([r["text"] for r in test_rows], padding=True, return_tensors="pt")
        ids = model(**batch).logits.argmax(-1).tolist()
    assert [model.config.id2label[i] for i in ids] == [w["predicted"] for w in written]


def test_pre_ln_export_runs_as_megatron_bert_for_ner(tokenizer_dir, tmp_path, capsys):
    """A pre-LN export loads as MegatronBertForTokenClassification and finds the entities of a
    fixed-list task (entity F1 > 0.8; tagging everything O gives 0)."""
    export = make_export(tokenizer_dir, tmp_path / "hf-pre", norm="pre")
    train = write_conll(tmp_path / "train.conll", ner_rows(300, 0))
    dev = write_conll(tmp_path / "dev.conll", ner_rows(80, 1))
    code, stdout, stderr = run_cli(
        [
            "--model",
            str(export),
            "--task",
            "ner",
            "--train",
            str(train),
            "--dev",
            str(dev),
            "--test",
            str(dev),
            "--epochs",
            "6",
            "--lr",
            "3e-3",
            "--batch-size",
            "16",
            "--out",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert code == 0, stderr
    assert "MegatronBertForTokenClassification" in stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["dev"]["f1"] > 0.8, report
    assert report["test"] == report["dev"]  # same file, best weights
    model = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "out")
    assert set(model.config.label2id) == {"O", "B-Disease", "I-Disease"}


def test_ner_alignment_fast_and_word_by_word_agree(export):
    """First-sub-word labels: word_ids() of the fast tokenizer and the word-by-word path used
    for slow tokenizers must give identical inputs, labels and word starts, truncation too."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    assert tokenizer.is_fast
    examples = [
        TokenExample(("Unbelievably", "long", "hyperparathyroidism", "x"), ("O", "O", "B-D", "O")),
        TokenExample(("a",) * 30 + ("hyperparathyroidism",) * 5, ("O",) * 30 + ("B-D",) * 5),
    ]
    label2id = {"O": 0, "B-D": 1, "I-D": 2}
    fast = tasks._encode_tokens_fast(examples, tokenizer, label2id, 40)
    slow = tasks._encode_tokens_slow(examples, tokenizer, label2id, 40)
    assert fast.features == slow.features
    assert fast.word_starts == slow.word_starts
    assert fast.truncated == slow.truncated == 1
    first = fast.features[0]
    pieces = tokenizer.tokenize("hyperparathyroidism")
    assert len(pieces) > 1  # the test needs a word split into several pieces
    start = fast.word_starts[0][2]
    assert first["labels"][start] == 1
    assert first["labels"][start + 1 : start + len(pieces)] == [tasks.IGNORE] * (len(pieces) - 1)
    assert first["labels"][0] == first["labels"][-1] == tasks.IGNORE  # [CLS], [SEP]


def test_pair_inputs_carry_segment_ids(export):
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    from pretrain.finetune.data import TextExample

    encoded = tasks.encode_text([TextExample("the man", "the day", "1")], tokenizer, {"1": 0}, 32)
    feature = encoded.features[0]
    sep = tokenizer.sep_token_id
    first_sep = feature["input_ids"].index(sep)
    assert feature["token_type_ids"][: first_sep + 1] == [0] * (first_sep + 1)
    assert set(feature["token_type_ids"][first_sep + 1 :]) == {1}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_model", "--model .* no such directory"),
        ("no_config", "has no config.json"),
        ("wrong_column", "no column 'review'"),
        ("unknown_dev_label", "label\\(s\\) maybe do not occur in the training data"),
        ("empty_train", "the file is empty"),
        ("one_label", "1 distinct label"),
        ("unknown_ner_type", "tag\\(s\\) B-Gene do not occur"),
        ("too_long", "--max-length 512 exceeds the model's 64 positions"),
        ("foreign_out", "not an earlier bert-finetune output"),
        ("incomplete_model", "1 encoder weights are missing .*output.dense.weight"),
        ("nan_weights", "weight .*output.dense.weight holds NaN or inf"),
        ("bad_config", "cannot read .*config.json"),
        ("no_cuda", "--device cuda: CUDA is not available here"),
    ],
)
def test_user_errors_are_one_line_exit_2(case, message, export, tmp_path, capsys):
    train = write_tsv(tmp_path / "train.tsv", keyword_rows(20, 0))
    dev = write_tsv(tmp_path / "dev.tsv", keyword_rows(10, 1))
    model, task, extra = str(export), "classify", []
    if case == "missing_model":
        model = str(tmp_path / "nowhere")
    elif case == "no_config":
        (tmp_path / "empty_model").mkdir()
        model = str(tmp_path / "empty_model")
    elif case == "wrong_column":
        extra = ["--text-column", "review"]
    elif case == "unknown_dev_label":
        write_tsv(dev, [{"text": "x", "label": "maybe"}])
    elif case == "empty_train":
        train.write_text("")
    elif case == "one_label":
        write_tsv(train, [{"text": "x", "label": "pos"}] * 3)
    elif case == "unknown_ner_type":
        task = "ner"
        train = write_conll(tmp_path / "train.conll", ner_rows(5, 0))
        dev = write_conll(tmp_path / "dev.conll", [{"tokens": ["BRCA1"], "tags": ["B-Gene"]}])
    elif case == "too_long":
        extra = ["--max-length", "512"]
    elif case in ("incomplete_model", "bad_config", "nan_weights"):
        model = str(tmp_path / "broken")
        shutil.copytree(export, model)
        if case == "bad_config":
            (tmp_path / "broken" / "config.json").write_text("{not json")
        elif case == "nan_weights":  # a diverged run's export
            weights = tmp_path / "broken" / "model.safetensors"
            tensors = load_file(str(weights))
            tensors["bert.encoder.layer.0.output.dense.weight"][0, 0] = math.nan
            save_file(tensors, str(weights), metadata={"format": "pt"})
        else:
            weights = tmp_path / "broken" / "model.safetensors"
            tensors = load_file(str(weights))
            del tensors["bert.encoder.layer.0.output.dense.weight"]
            save_file(tensors, str(weights), metadata={"format": "pt"})
    elif case == "no_cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        extra = ["--device", "cuda"]
    elif case == "foreign_out":
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "notes.txt").write_text("mine")
        extra = ["--out", str(tmp_path / "busy")]
    code, stdout, stderr = run_cli(
        ["--model", model, "--task", task, "--train", str(train), "--dev", str(dev), *extra], capsys
    )
    assert code == 2
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("bert-finetune: error: ")
    import re

    assert re.search(message, lines[0]), lines[0]


def test_rerun_needs_force(export, tmp_path, capsys):
    train = write_tsv(tmp_path / "train.tsv", keyword_rows(40, 0))
    dev = write_tsv(tmp_path / "dev.tsv", keyword_rows(10, 1))
    argv = [
        "--model",
        str(export),
        "--task",
        "classify",
        "--train",
        str(train),
        "--dev",
        str(dev),
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "o"),
    ]
    assert run_cli(argv, capsys)[0] == 0
    code, _, stderr = run_cli(argv, capsys)
    assert code == 2 and "pass --force" in stderr
    assert run_cli([*argv, "--force"], capsys)[0] == 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_runs(precision, export, tmp_path, capsys):
    """Autocast paths (fp16 with loss scaling) run end to end on the CPU; the loss stays finite
    (no learning claim: 2 short epochs)."""
    train = write_tsv(tmp_path / "train.tsv", keyword_rows(64, 0))
    dev = write_tsv(tmp_path / "dev.tsv", keyword_rows(16, 1))
    code, stdout, stderr = run_cli(
        [
            "--model",
            str(export),
            "--task",
            "classify",
            "--train",
            str(train),
            "--dev",
            str(dev),
            "--epochs",
            "2",
            "--precision",
            precision,
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 0, stderr
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert saved["precision"] == precision
    assert all(math.isfinite(record["train_loss"]) for record in saved["history"])


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    """The real entry point in a fresh process (what the console script runs): exit 2, one
    line on stderr, nothing on stdout."""
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.finetune.cli",
            "--model",
            str(tmp_path / "missing"),
            "--task",
            "ner",
            "--train",
            "t.tsv",
            "--dev",
            "d.tsv",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"bert-finetune: error: --model {tmp_path / 'missing'}: no such directory"
    ]


def test_bf16_refused_on_a_capability_7_gpu(export, tmp_path, capsys, monkeypatch):
    """A simulated V100 (CUDA availability and the capability query patched at torch's
    boundary): --precision bf16 ends in one line naming auto/fp16, before any data is read."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    train = write_tsv(tmp_path / "train.tsv", keyword_rows(8, 0))
    code, stdout, stderr = run_cli(
        [
            "--model",
            str(export),
            "--task",
            "classify",
            "--train",
            str(train),
            "--dev",
            str(train),
            "--precision",
            "bf16",
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1
    assert "compute capability 7.0" in stderr and "auto or fp16" in stderr
