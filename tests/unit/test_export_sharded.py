"""`bert-export --dtype bf16|fp16 --max-shard-size`: half-precision safetensors shards + index.

Oracle: transformers itself. The sharded half-precision export must load through its
`model.safetensors.index.json` with no missing keys, in the exported dtype, and give the logits
of the fp32 export of the same model to within what rounding the weights to that dtype moves
them: bf16 keeps 8 significant bits (relative rounding 2^-9), fp16 11 (2^-12); through two
layers and the MLM head the logits moved by 0.27% (bf16) / 0.033% (fp16) of their range
here (measured), and the bounds below are about 4x that; the fp16 bound fails bf16 rounding.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain import export_hf
from pretrain.checkpoint import save_checkpoint
from pretrain.config import Config, ConfigError, ModelShape
from pretrain.model import build_model

transformers = pytest.importorskip("transformers")

SHAPE = ModelShape(
    layers=2,
    hidden=48,
    heads=3,
    ffn_hidden=80,
    vocab_size=131,
    max_seq_len=40,
    norm="post",
    dropout=0.1,
    pair_head=False,
)
TOLERANCE = {"bf16": 0.012, "fp16": 0.0015}  # of the fp32 logits' range
TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _model():
    torch.manual_seed(0)
    model = build_model(SHAPE)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(0.05 * torch.randn_like(param)) if "norm" in name or name.endswith(
                "bias"
            ) else param.mul_(1.0 + 0.5 * torch.rand_like(param))
    return model.eval()


def _logits(directory: Path, dtype: torch.dtype) -> torch.Tensor:
    hf, info = transformers.BertForPreTraining.from_pretrained(
        directory, output_loading_info=True, dtype="auto"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert hf.dtype == dtype
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, SHAPE.vocab_size, (2, 12), generator=generator)
    with torch.no_grad():
        return hf.float().eval()(input_ids=ids).prediction_logits


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_sharded_half_precision_export_loads_with_the_same_logits(tmp_path, dtype):
    model = _model()
    full = tmp_path / "fp32"
    full.mkdir()
    export_hf.write_hf_model(model, full)
    assert (full / "model.safetensors").is_file() and not (full / "model-00001-of-00001").exists()

    half = tmp_path / dtype
    half.mkdir()
    lines: list[str] = []
    export_hf.write_hf_model(model, half, dtype, max_shard_bytes=20_000, progress=lines.append)
    index = json.loads((half / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and len(lines) == len(files)
    assert lines[-1].startswith(f"wrote shard {len(files)}/{len(files)}: {files[-1]}")
    assert not (half / "model.safetensors").exists()
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        shard = load_file(half / file)
        assert (
            sum(t.numel() * t.element_size() for t in shard.values()) <= 20_000 or len(shard) == 1
        )
        tensors.update(shard)
    assert set(tensors) == set(index["weight_map"]) == set(load_file(full / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {TORCH_DTYPE[dtype]}
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    assert (
        json.loads((half / "config.json").read_text())["dtype"] == export_hf.HF_DTYPE_NAMES[dtype]
    )

    reference = _logits(full, torch.float32)
    got = _logits(half, TORCH_DTYPE[dtype])
    spread = (reference.max() - reference.min()).item()
    assert (got - reference).abs().max().item() < TOLERANCE[dtype] * spread

    # And back into our model (train.init_from): exactly the rounded weights.
    fresh = build_model(SHAPE)
    export_hf.load_hf_weights(half, fresh)
    for name, tensor in model.state_dict().items():
        rounded = tensor.to(TORCH_DTYPE[dtype]).float()
        assert torch.equal(fresh.state_dict()[name], rounded), name


def test_fp16_overflow_is_refused(tmp_path):
    model = _model()
    with torch.no_grad():
        model.pooler.weight[0, 0] = 1e6
    with pytest.raises(ConfigError, match="beyond the fp16 range"):
        export_hf.write_hf_model(model, tmp_path, "fp16")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "text, size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2**31), ("1234", 1234)]
)
def test_parse_size(text, size):
    assert export_hf.parse_size(text) == size


@pytest.mark.parametrize("text", ["five", "5TB", "0", "-1GB"])
def test_parse_size_errors(text):
    with pytest.raises(ConfigError, match="--max-shard-size"):
        export_hf.parse_size(text)


def test_cli_prints_a_line_per_shard(tmp_path, capsys):
    """The command a user runs: progress on stderr, shards + index in --out, one-line errors."""
    model = _model()
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_text("{}")
    state = {
        "model_shape": dataclasses.asdict(SHAPE),
        "config": Config().to_dict(),
        "tokenizer_dir": str(tokenizer_dir),
        "layout": {"tp": 1, "dp": 1, "world_size": 1},
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "checkpoints", 7, model, optimizer, state, keep=1)
    out = tmp_path / "hf"
    argv = ["--checkpoint", str(tmp_path / "checkpoints"), "--out", str(out), "--dtype", "fp16"]
    assert export_hf.main([*argv, "--max-shard-size", "20KB"]) == 0
    err = capsys.readouterr().err.splitlines()
    files = sorted(
        set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    )
    # Hashing every file comes first and takes minutes on a large model: it is announced.
    assert err[0].startswith("bert-export: verifying ") and " files, " in err[0]
    assert err[1].startswith("bert-export: loading ") and "parameters" in err[1]
    assert [line.split(":")[1].strip() for line in err[2:]] == [
        f"wrote shard {k}/{len(files)}" for k in range(1, len(files) + 1)
    ]
    # One file (under the default 5GB): its line too.
    single = tmp_path / "hf-single"
    assert (
        export_hf.main(["--checkpoint", str(tmp_path / "checkpoints"), "--out", str(single)]) == 0
    )
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("bert-export: verifying ") and len(err) == 3
    assert err[2].startswith("bert-export: wrote model.safetensors (")
    assert (single / "model.safetensors").is_file()
    assert export_hf.main([*argv, "--force", "--max-shard-size", "lots"]) == 2
    assert capsys.readouterr().err == (
        "bert-export: error: --max-shard-size 'lots': give a size such as 5GB, 500MB or 2GiB\n"
    )
    assert (out / files[0]).is_file()  # the earlier export is untouched
