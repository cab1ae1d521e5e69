"""Japanese MeCab-WordPiece exports fine-tune with transformers' BertJapaneseTokenizer.

`bert-prep tokenizer --pretokenize mecab` writes the tokenizer_config.json that transformers'
BertJapaneseTokenizer needs (word_tokenizer_type mecab, mecab_kwargs unidic_lite, wordpiece
sub-words) and bert-export copies it, so a user needs no code of ours. That tokenizer is a slow
(Python) one: no word_ids(), so NER takes the word-by-word alignment path, and it must still
produce segment ids for pairs. Oracles: the tokenizer class transformers picks; its word
segmentation against bert-prep's (the words the vocabulary was trained on); segment ids after
the first [SEP]; and the word-by-word alignment giving every word a start position.
Needs the `ja` extra (fugashi, unidic-lite); skipped otherwise.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest

from data_prep import cli as prep_cli
from data_prep.sources import CORPUS_DIR
from data_prep.tokenizer import mecab_segmenter
from pretrain.finetune import cli, tasks
from pretrain.finetune.data import TextExample, TokenExample

pytest.importorskip("fugashi")
pytest.importorskip("unidic_lite")
transformers = pytest.importorskip("transformers")

from tests.unit.test_finetune_cli import make_export  # noqa: E402


@pytest.fixture(scope="module")
def mecab_export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mecab")
    code = prep_cli.main(
        [
            "tokenizer",
            "--input",
            str(CORPUS_DIR / "akutagawa.txt"),
            "--out",
            str(tmp / "tok"),
            "--kind",
            "wordpiece",
            "--vocab-size",
            "1500",
            "--lang",
            "ja",
            "--pretokenize",
            "mecab",
        ]
    )
    assert code == 0
    return make_export(tmp / "tok", tmp / "hf")


def sentences() -> list[str]:
    text = (CORPUS_DIR / "akutagawa.txt").read_text(encoding="utf-8")
    parts = [s.strip() + "。" for s in text.split("。")]
    return [s for s in parts if 8 <= len(s) <= 60][:200]


def test_mecab_export_loads_as_bert_japanese_tokenizer(mecab_export, tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(mecab_export)
    assert type(tokenizer).__name__ == "BertJapaneseTokenizer"
    assert tokenizer.word_tokenizer_type == "mecab" and not tokenizer.is_fast
    # The words transformers cuts are the words bert-prep trained and encoded with.
    text = "ある日の暮方の事である。一人の下人が、羅生門の下で雨やみを待っていた。"
    assert tokenizer.word_tokenizer.tokenize(text) == mecab_segmenter()(text).split()

    # Segment ids even from a config without model_input_names (e.g. an older Tohoku-style
    # tokenizer_config.json), where the tokenizer leaves them out unless asked.
    bare = tmp_path / "bare"
    shutil.copytree(mecab_export, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("model_input_names", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    tokenizer = transformers.AutoTokenizer.from_pretrained(bare)
    assert "token_type_ids" not in tokenizer("雨が降る。", "下人が待つ。")
    pair = tasks.encode_text(
        [TextExample("雨が降る。", "下人が待つ。", "x")], tokenizer, {"x": 0}, 32
    )
    feature = pair.features[0]
    first_sep = feature["input_ids"].index(tokenizer.sep_token_id)
    assert set(feature["token_type_ids"][first_sep + 1 :]) == {1}

    words = ("下人", "は", "羅生門", "の", "下", "で", "雨やみ", "を", "待っ", "て", "いた")
    example = TokenExample(words, ("B-P", "O", "B-L", "O", "O", "O", "O", "O", "O", "O", "O"))
    encoded = tasks.encode_tokens([example], tokenizer, {"O": 0, "B-P": 1, "B-L": 2}, 64)
    starts = encoded.word_starts[0]
    assert all(s is not None for s in starts)
    labels = encoded.features[0]["labels"]
    assert [labels[s] for s in starts] == [1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0]


def test_mecab_export_fine_tunes_pairs_and_saves_its_tokenizer(mecab_export, tmp_path, capsys):
    """One epoch on next-sentence pairs: runs, scores, and the saved directory reloads as
    BertJapaneseTokenizer (no learning claim: a random 1-layer model and 80 pairs)."""
    items = sentences()
    rng = random.Random(0)
    rows = []
    for i in range(len(items) - 1):
        b = items[i + 1] if i % 2 else rng.choice(items)
        rows.append({"text": items[i], "text_b": b, "label": "next" if i % 2 else "random"})
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:80]))
    dev.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[80:120]))
    out = tmp_path / "out"
    code = cli.main(
        [
            "--model",
            str(mecab_export),
            "--task",
            "pair",
            "--train",
            str(train),
            "--dev",
            str(dev),
            "--epochs",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["dev"]["examples"] == 40
    reloaded = transformers.AutoTokenizer.from_pretrained(out)
    assert type(reloaded).__name__ == "BertJapaneseTokenizer"
