"""Hugging Face export/import (pretrain/export_hf.py).

The oracle is `transformers` itself: an export must load into BertForPreTraining /
MegatronBertForPreTraining with no missing keys and give the same MLM (and pair) logits as our
model, in fp32 to 1e-4 (the two differ only in summation order of the same maths).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pytest
import torch

from pretrain import export_hf
from pretrain.checkpoint import save_checkpoint, sha256_file
from pretrain.config import Config, ConfigError, ModelShape
from pretrain.model import Bert, build_model

transformers = pytest.importorskip("transformers")

CORPUS = Path(__file__).resolve().parents[2] / "data_prep" / "corpus" / "gutenberg_excerpt.txt.gz"
PRETRAINING_CLASS = {
    "post": transformers.BertForPreTraining,
    "pre": transformers.MegatronBertForPreTraining,
}


def odd_shape(norm: str, pair_head: bool, vocab_size: int = 131) -> ModelShape:
    """Sizes that divide nothing nicely: hidden 48 over 3 heads (d=16), ffn 80, vocab 131."""
    return ModelShape(
        layers=2,
        hidden=48,
        heads=3,
        ffn_hidden=80,
        vocab_size=vocab_size,
        max_seq_len=40,
        norm=norm,
        dropout=0.1,
        pair_head=pair_head,
    )


def random_model(shape: ModelShape, seed: int = 0) -> Bert:
    """Weights away from init: LayerNorm gains/biases and all biases would hide a swapped or
    dropped tensor if they stayed at 1 and 0."""
    torch.manual_seed(seed)
    model = build_model(shape)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
            else:
                param.mul_(1.0 + 0.5 * torch.rand_like(param))
    return model.eval()


def inputs(vocab_size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows of 12 tokens with both segments; row 1 padded from position 7."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (2, 12), generator=generator)
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    return ids, types, mask


def our_logits(model: Bert, ids, types, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    with torch.no_grad():
        hidden = model(ids, types, mask)
        mlm = model.mlm_head.transform(hidden) @ model.decoder_weight.T + model.mlm_head.bias
        pair = model.pair_logits(hidden) if model.pair_head is not None else None
    return mlm, pair


@pytest.mark.parametrize("pair_head", [True, False], ids=["pair", "nopair"])
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_transformers_gives_the_same_logits(tmp_path, norm, pair_head):
    """Oracle: transformers' own (Megatron)BertForPreTraining on the exported files; logits of
    every position (padding included) and the pair logits agree to 1e-4 in fp32, and the
    pre-training and masked-LM classes load with no missing or unexpected weights."""
    shape = odd_shape(norm, pair_head)
    model = random_model(shape)
    export_hf.write_hf_model(model, tmp_path)

    hf, info = PRETRAINING_CLASS[norm].from_pretrained(
        tmp_path, output_loading_info=True, dtype=torch.float32
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    hf.eval()
    ids, types, mask = inputs(shape.vocab_size)
    mlm, pair = our_logits(model, ids, types, mask)
    with torch.no_grad():
        out = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
    assert (out.prediction_logits - mlm).abs().max().item() < 1e-4
    if pair is not None:
        assert (out.seq_relationship_logits - pair).abs().max().item() < 1e-4
    else:  # documented: zeros, so an untrained pair head says 50/50
        assert torch.count_nonzero(out.seq_relationship_logits) == 0

    masked_lm, info = transformers.AutoModelForMaskedLM.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"], info
    # BertForMaskedLM has neither pooler nor pair head: those are the only leftovers.
    assert all(
        k.startswith(("bert.pooler.", "cls.seq_relationship.")) for k in info["unexpected_keys"]
    ), info
    with torch.no_grad():
        logits = masked_lm.eval()(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
    assert (logits - mlm).abs().max().item() < 1e-4


@pytest.mark.parametrize("pair_head", [True, False], ids=["pair", "nopair"])
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_round_trip_through_an_export_is_exact(tmp_path, norm, pair_head):
    """Oracle: the original state dict; export then `load_hf_weights` is bit-exact
    (split/fuse of QKV only moves rows)."""
    shape = odd_shape(norm, pair_head)
    model = random_model(shape, seed=3)
    export_hf.write_hf_model(model, tmp_path)
    fresh = build_model(shape)
    export_hf.load_hf_weights(tmp_path, fresh)
    expected, got = model.state_dict(), fresh.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_qkv_split_matches_the_per_head_layout():
    """Oracle: model.py's own reading of the fused rows, view(heads, 3, d, H)[:, j]."""
    heads, d, hidden = 3, 4, 12
    fused = torch.randn(3 * hidden, hidden)
    query, key, value = export_hf.split_qkv(fused, heads)
    per_head = fused.view(heads, 3, d, hidden)
    assert torch.equal(key[d : 2 * d], per_head[1, 1])  # head 1's key rows
    assert torch.equal(value, per_head[:, 2].reshape(hidden, hidden))
    assert torch.equal(export_hf.fuse_qkv(query, key, value, heads), fused)


def test_import_of_transformers_saves_masked_lm_and_base_model(tmp_path):
    """Oracle: the exported weights. transformers re-saves the export as BertForMaskedLM (no
    pooler, no pair head) and as BertModel (no `bert.` prefix, no heads); importing either
    restores every tensor that file holds, and the rest keeps the fresh model's values."""
    shape = odd_shape("post", pair_head=True)
    model = random_model(shape, seed=5)
    export = tmp_path / "export"
    export.mkdir()
    export_hf.write_hf_model(model, export)
    transformers.BertForMaskedLM.from_pretrained(export).save_pretrained(tmp_path / "mlm")
    transformers.BertModel.from_pretrained(export).save_pretrained(tmp_path / "base")

    for name, kept in (
        ("mlm", ("pooler.", "pair_head.")),
        ("base", ("pooler.", "pair_head.", "mlm_head.")),
    ):
        torch.manual_seed(9)
        fresh = build_model(shape)
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        export_hf.load_hf_weights(tmp_path / name, fresh)
        for key, value in fresh.state_dict().items():
            if key.startswith(kept) and not (name == "base" and key.startswith("pooler.")):
                assert torch.equal(value, before[key]), (name, key)
            else:
                assert torch.equal(value, model.state_dict()[key]), (name, key)


def test_import_of_pytorch_model_bin_with_legacy_names(tmp_path):
    """Oracle: the exported weights. An old-style pytorch_model.bin (BertModel names without
    `bert.`, TF-era LayerNorm gamma/beta, a position_ids buffer, a tied decoder copy) loads to
    the same encoder and MLM head."""
    shape = odd_shape("post", pair_head=False)
    model = random_model(shape, seed=7)
    tensors = export_hf.to_hf_state_dict(model)
    legacy = {}
    for key, value in tensors.items():
        key = key.removeprefix("bert.")
        if "LayerNorm" in key:
            key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
        legacy[key] = value
    legacy["embeddings.position_ids"] = torch.arange(shape.max_seq_len)[None]
    legacy["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"]
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(export_hf.hf_config(shape)))
    fresh = build_model(shape)
    export_hf.load_hf_weights(tmp_path, fresh)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"hidden_size": 64}, "hidden_size=64 but model.hidden=48"),
        ({"num_hidden_layers": 3}, "set model.layers=3"),
        ({"model_type": "megatron-bert"}, "set model.norm=pre"),
        ({"model_type": "roberta"}, "is not BERT"),
        ({"hidden_act": "gelu_new"}, "hidden_act='gelu_new' is not supported"),
    ],
)
def test_import_names_the_mismatching_field(tmp_path, change, fragment):
    """Oracle: docs/design.md's rule that user errors name the key and the fix."""
    shape = odd_shape("post", pair_head=False)
    export_hf.write_hf_model(build_model(shape), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        export_hf.load_hf_weights(tmp_path, build_model(shape))


def _tiny_tokenizer(tmp_path: Path) -> Path:
    """A WordPiece tokenizer trained on the first 8 KB of the built-in English corpus."""
    tokenizer = pytest.importorskip("data_prep.tokenizer")
    text = gzip.open(CORPUS, "rt", encoding="utf-8").read(8000)
    sample = tmp_path / "sample.txt"
    sample.write_text(text, encoding="utf-8")
    return tokenizer.train_tokenizer(
        [sample],
        tmp_path / "tokenizer",
        "wordpiece",
        vocab_size=300,
        lang="en",
        sample_bytes=8000,
    )


def _checkpoint(
    tmp_path: Path, shape: ModelShape, tokenizer_dir: Path, poison: bool = False
) -> Path:
    """A real step directory written by save_checkpoint, with the fields the trainer stores
    (`poison`: one weight is NaN, as after a divergence)."""
    model = random_model(shape, seed=11)
    if poison:
        with torch.no_grad():
            next(model.parameters())[0] = float("nan")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {
        "model_shape": dataclasses.asdict(shape),
        "config": Config().to_dict(),
        "tokenizer_dir": str(tokenizer_dir),
        "layout": {"tp": 1, "dp": 1, "world_size": 1},
    }
    return save_checkpoint(tmp_path / "checkpoints", 7, model, optimizer, state, keep=2)


def test_export_checkpoint_loads_in_transformers_with_its_tokenizer(tmp_path, capsys):
    """Oracle: transformers' Auto classes. The CLI export of a real checkpoint loads as a
    masked LM, and AutoTokenizer gives the ids of our tokenizer ([CLS] text [SEP]); re-export
    needs --force."""
    tokenizer_dir = _tiny_tokenizer(tmp_path)
    from data_prep.tokenizer import load_tokenizer, tokenizer_info

    vocab = tokenizer_info(tokenizer_dir)["vocab_size"]
    shape = odd_shape("pre", pair_head=False, vocab_size=vocab)
    _checkpoint(tmp_path, shape, tokenizer_dir)
    out = tmp_path / "hf"
    argv = ["--checkpoint", str(tmp_path / "checkpoints"), "--out", str(out)]
    assert export_hf.main(argv) == 0
    assert "AutoModelForMaskedLM.from_pretrained" in capsys.readouterr().out

    model, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "MegatronBertForMaskedLM"
    assert not info["missing_keys"], info
    assert (out / "pretrain_config.yaml").is_file()
    text = "It was the best of times, it was the worst of times."
    ours = load_tokenizer(tokenizer_dir).encode(text, add_special_tokens=False).ids
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer(text)["input_ids"] == [2, *ours, 3]
    assert hf_tokenizer.model_max_length == shape.max_seq_len
    # The exported tokenizer.json is byte-identical, so our loader's hash check passes on it.
    load_tokenizer(out)

    assert export_hf.main(argv) == 2
    assert "pass --force" in capsys.readouterr().err
    assert export_hf.main([*argv, "--force"]) == 0
    assert not list(tmp_path.glob(".hf.*"))  # no temporary or old directories left behind


def test_export_refuses_what_it_must_not_overwrite(tmp_path):
    """Oracle: the export contract: a non-empty directory that is not an export is never
    replaced, even with --force; a changed tokenizer is refused by hash."""
    shape = odd_shape("post", pair_head=True)
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_text("{}")
    step = _checkpoint(tmp_path, shape, tokenizer_dir)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an earlier export"):
        export_hf.export_checkpoint(step, precious, force=True)
    assert (precious / "notes.txt").read_text() == "keep me"

    state = json.loads((step / "train_state.json").read_text())
    (step / "train_state.json").write_text(json.dumps({**state, "tokenizer_hash": "0" * 64}))
    sums = json.loads((step / "checksums.json").read_text())  # a consistent checkpoint
    sums["train_state.json"] = sha256_file(step / "train_state.json")
    (step / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(ConfigError, match="hash mismatch"):
        export_hf.export_checkpoint(step, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    """Oracle: docs/design.md's command contract: exit 2, one line on stderr, no traceback."""
    code = export_hf.main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("bert-export: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_export_refuses_non_finite_weights(tmp_path, capsys):
    """A diverged run's checkpoint (NaN in a weight) is refused in one line, exit 2, and
    nothing is written; before, it was exported and loaded as a broken model."""
    tokenizer_dir = _tiny_tokenizer(tmp_path)
    from data_prep.tokenizer import tokenizer_info

    vocab = tokenizer_info(tokenizer_dir)["vocab_size"]
    shape = odd_shape("post", pair_head=False, vocab_size=vocab)
    step = _checkpoint(tmp_path, shape, tokenizer_dir, poison=True)
    capsys.readouterr()
    assert export_hf.main(["--checkpoint", str(step), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    progress = [
        line
        for line in err
        if line.startswith(("bert-export: verifying ", "bert-export: loading "))
    ]
    errors = [line for line in err if line not in progress]  # one line after the progress
    assert len(errors) == 1 and "holds NaN or inf" in errors[0], err
    assert not (tmp_path / "hf").exists()
