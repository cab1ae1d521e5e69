"""Hugging Face export and import: our `Bert` ↔ `transformers`' BERT / Megatron-BERT.

    bert-export --checkpoint runs/demo/checkpoints --out runs/demo/hf [--force]
        [--dtype fp32|bf16|fp16] [--max-shard-size 5GB]

writes a directory that `transformers` loads with no code of ours:

    AutoModelForMaskedLM.from_pretrained(OUT), AutoTokenizer.from_pretrained(OUT)

Post-LN models become `BertForPreTraining` (model_type "bert"); pre-LN models become
`MegatronBertForPreTraining` (model_type "megatron-bert"), whose layout ours matches exactly.
The conversion is a key-mapping table (our parameter name ↔ HF name) per LayerNorm style, plus
one real transformation: our fused QKV projection (rows laid out [heads, 3, d]) is split into
HF's separate query/key/value projections, and fused again on import.

Files of an export: model.safetensors (HF names, in `--dtype`, fp32 by default; a model larger
than `--max-shard-size` is split into model-00001-of-0000N.safetensors shards with the
model.safetensors.index.json that transformers reads; a progress line is printed as the
checkpoint is verified and loaded and as each file of weights is written), config.json, the
tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json, vocab.txt or
the SentencePiece model, and our bert_tokenizer.json), and pretrain_config.yaml (the run config
stored in the checkpoint). The directory is written under a temporary name and renamed.

`load_hf_weights` is the reverse, for `train.init_from=<HF dir>`: continue pre-training an
existing BERT (ours or anyone's).

This module does not import `transformers` (an optional extra): exporting needs only
safetensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from pretrain.checkpoint import (
    CheckpointError,
    check_intact,
    load_model_weights,
    non_finite_tensor,
    read_train_state,
    resolve_checkpoint,
    sha256_file,
)
from pretrain.config import ConfigError, ModelShape
from pretrain.model import LAYER_NORM_EPS, Bert, build_model, count_parameters

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' own default for save_pretrained
CONFIG_FILE = "config.json"
RUN_CONFIG_FILE = "pretrain_config.yaml"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "sentencepiece.model",
    "bert_tokenizer.json",
)
"""Copied from the tokenizer directory when present; tokenizer.json is required."""

HF_ARCHITECTURE = {"post": "BertForPreTraining", "pre": "MegatronBertForPreTraining"}
HF_MODEL_TYPE = {"post": "bert", "pre": "megatron-bert"}

# ---------------------------------------------------------------------------------------------
# The key-mapping table. Module pairs (ours, HF); each maps its listed parameters one to one.

_LINEAR = ("weight", "bias")
_EMBEDDING = ("weight",)

_TOP_MODULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("embeddings.word", "bert.embeddings.word_embeddings", _EMBEDDING),
    ("embeddings.position", "bert.embeddings.position_embeddings", _EMBEDDING),
    ("embeddings.token_type", "bert.embeddings.token_type_embeddings", _EMBEDDING),
    ("pooler", "bert.pooler.dense", _LINEAR),
    ("mlm_head.dense", "cls.predictions.transform.dense", _LINEAR),
    ("mlm_head.norm", "cls.predictions.transform.LayerNorm", _LINEAR),
)
_NORM_MODULES: dict[str, tuple[tuple[str, str], ...]] = {
    # BertEmbeddings normalises the embeddings; MegatronBertEncoder has a final LayerNorm.
    "post": (("embeddings.norm", "bert.embeddings.LayerNorm"),),
    "pre": (("final_norm", "bert.encoder.ln"),),
}
_LAYER_MODULES: dict[str, tuple[tuple[str, str], ...]] = {
    # BertLayer: LayerNorm after each residual add, inside attention.output / output.
    "post": (
        ("attention.out", "attention.output.dense"),
        ("attention_norm", "attention.output.LayerNorm"),
        ("mlp.fc_in", "intermediate.dense"),
        ("mlp.fc_out", "output.dense"),
        ("mlp_norm", "output.LayerNorm"),
    ),
    # MegatronBertLayer: attention.ln before self-attention, ln before the MLP.
    "pre": (
        ("attention.out", "attention.output.dense"),
        ("attention_norm", "attention.ln"),
        ("mlp.fc_in", "intermediate.dense"),
        ("mlp.fc_out", "output.dense"),
        ("mlp_norm", "ln"),
    ),
}
_PAIR_HEAD = ("pair_head", "cls.seq_relationship")
_MLM_BIAS = ("mlm_head.bias", "cls.predictions.bias")
_QKV = "layers.{i}.attention.qkv"
_HF_QKV = "bert.encoder.layer.{i}.attention.self.{part}"
_QKV_PARTS = ("query", "key", "value")  # index 0, 1, 2 of our [heads, 3, d] row layout

OPTIONAL_ON_IMPORT = ("pooler.", "mlm_head.", "pair_head.")
"""Our parameters that an HF checkpoint may lack (BertModel, BertForMaskedLM, fine-tuned
models); they keep their fresh initialisation."""

# HF names that carry nothing of their own: the decoder is tied to the word embeddings (weight)
# and to cls.predictions.bias (bias); position_ids/token_type_ids are buffers older
# transformers versions saved.
_TIED_OR_BUFFERS = (
    "cls.predictions.decoder.weight",
    "cls.predictions.decoder.bias",
    "bert.embeddings.position_ids",
    "bert.embeddings.token_type_ids",
)
_HF_BASE_MODULES = ("embeddings.", "encoder.", "pooler.")  # BertModel saved without "bert."
_LEGACY_SUFFIXES = {".gamma": ".weight", ".beta": ".bias"}  # TF-converted LayerNorm names

# HF config field → (our ModelShape field, the config key a user sets).
_SHAPE_FIELDS = (
    ("num_hidden_layers", "layers", "model.layers"),
    ("hidden_size", "hidden", "model.hidden"),
    ("num_attention_heads", "heads", "model.heads"),
    ("intermediate_size", "ffn_hidden", "model.ffn_hidden"),
    ("vocab_size", "vocab_size", "model.vocab_size"),
    ("max_position_embeddings", "max_seq_len", "model.max_seq_len"),
)


def hf_key_map(shape: ModelShape) -> dict[str, str]:
    """Our parameter name → HF name, for every parameter except the fused QKV projections."""
    mapping: dict[str, str] = {}

    def add(ours: str, theirs: str, params: tuple[str, ...] = _LINEAR) -> None:
        for param in params:
            mapping[f"{ours}.{param}"] = f"{theirs}.{param}"

    for ours, theirs, params in _TOP_MODULES:
        add(ours, theirs, params)
    for ours, theirs in _NORM_MODULES[shape.norm]:
        add(ours, theirs)
    for i in range(shape.layers):
        for ours, theirs in _LAYER_MODULES[shape.norm]:
            add(f"layers.{i}.{ours}", f"bert.encoder.layer.{i}.{theirs}")
    if shape.pair_head:
        add(*_PAIR_HEAD)
    mapping[_MLM_BIAS[0]] = _MLM_BIAS[1]
    return mapping


def qkv_key_map(shape: ModelShape) -> dict[str, tuple[str, str, str]]:
    """Our fused QKV parameter name → its HF (query, key, value) names."""
    mapping = {}
    for i in range(shape.layers):
        for param in _LINEAR:
            hf = tuple(f"{_HF_QKV.format(i=i, part=part)}.{param}" for part in _QKV_PARTS)
            mapping[f"{_QKV.format(i=i)}.{param}"] = hf
    return mapping


def split_qkv(fused: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """[3H(, H)] with rows laid out [heads, 3, d] → query, key, value, each [H(, H)].

    HF keeps head h in rows h*d:(h+1)*d of each projection, which is our layout with the
    middle axis (q/k/v) pulled out.
    """
    rest = fused.shape[1:]
    per_head = fused.reshape(heads, 3, -1, *rest)  # [h, 3, d, ...]
    return tuple(per_head[:, j].reshape(-1, *rest).contiguous() for j in range(3))


def fuse_qkv(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int
) -> torch.Tensor:
    """Inverse of `split_qkv`: three [H(, H)] projections → [3H(, H)] in [heads, 3, d] rows."""
    rest = query.shape[1:]
    parts = [t.reshape(heads, -1, *rest) for t in (query, key, value)]  # each [h, d, ...]
    return torch.stack(parts, dim=1).reshape(-1, *rest)


# ---------------------------------------------------------------------------------------------
# Export


def hf_config(shape: ModelShape, dtype: str = "fp32") -> dict[str, Any]:
    """config.json for BertConfig (post-LN) or MegatronBertConfig (pre-LN).

    `tie_word_embeddings` tells transformers that the decoder is the word embedding, which is
    why the export carries no `cls.predictions.decoder.*` tensors (as HF's own save_pretrained).
    """
    return {
        "architectures": [HF_ARCHITECTURE[shape.norm]],
        "model_type": HF_MODEL_TYPE[shape.norm],
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "intermediate_size": shape.ffn_hidden,
        "hidden_act": "gelu",  # exact (erf) GELU, as F.gelu in model.py
        "hidden_dropout_prob": shape.dropout,
        "attention_probs_dropout_prob": shape.dropout,
        "max_position_embeddings": shape.max_seq_len,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": LAYER_NORM_EPS,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",  # read by transformers 4.x
        "tie_word_embeddings": True,
        "is_decoder": False,
        "add_cross_attention": False,
        "dtype": HF_DTYPE_NAMES[dtype],
    }


def to_hf_state_dict(model: Bert) -> dict[str, torch.Tensor]:
    """HF-named fp32 CPU tensors for `BertForPreTraining` / `MegatronBertForPreTraining`.

    Tensors other than the split QKV may share memory with the model: save them before
    training on. A model without a pair head still gets `cls.seq_relationship` (zeros: its
    NSP logits are 0, 0, an honest "untrained", and the export is deterministic) so the
    pre-training class loads with no missing keys. The pooler is always exported (it is
    untrained when there is no pair head; fine-tuning trains it).
    """
    shape = model.shape
    names = hf_key_map(shape)
    qkv_names = qkv_key_map(shape)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu", torch.float32)
        if name in qkv_names:
            for hf_name, part in zip(qkv_names[name], split_qkv(tensor, shape.heads), strict=True):
                out[hf_name] = part
        elif name in names:
            out[names[name]] = tensor.contiguous()
        else:  # a parameter the table does not know: the table is out of date with model.py
            raise RuntimeError(f"export_hf: no Hugging Face name for parameter {name!r}")
    if not shape.pair_head:
        out["cls.seq_relationship.weight"] = torch.zeros(2, shape.hidden)
        out["cls.seq_relationship.bias"] = torch.zeros(2)
    return out


def parse_size(text: str) -> int:
    """Bytes in `5GB`, `500MB`, `2GiB` or a plain number (GB = 10^9, GiB = 2^30, as in HF)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise ConfigError(f"--max-shard-size {text!r}: give a size such as 5GB, 500MB or 2GiB")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20}
    scale["GIB"] = 2**30
    size = int(float(match.group(1)) * scale[unit])
    if size <= 0:
        raise ConfigError(f"--max-shard-size {text!r} must be positive")
    return size


def shard_names(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most `max_shard_bytes`, in order (a tensor
    larger than that gets a shard of its own, as transformers does)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_hf_model(
    model: Bert,
    out_dir: Path,
    dtype: str = "fp32",
    max_shard_bytes: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> None:
    """The weights in `dtype` (one model.safetensors, or shards + index beyond
    `max_shard_bytes`) and config.json, into an existing directory (no tokenizer)."""
    tensors = {k: v.to(EXPORT_DTYPES[dtype]) for k, v in to_hf_state_dict(model).items()}
    if dtype == "fp16":
        overflow = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
        if overflow:
            raise CheckpointError(
                f"{overflow[0]} has weights beyond the fp16 range (65504): export with "
                "--dtype bf16 or fp32"
            )
    shards = shard_names(tensors, max_shard_bytes or sum(_nbytes(t) for t in tensors.values()))
    # metadata format=pt: transformers refuses safetensors files without it.
    if len(shards) == 1:
        save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
        if progress is not None:
            written = sum(_nbytes(t) for t in tensors.values()) / 1e9
            progress(f"wrote {WEIGHTS_FILE} ({written:.2f} GB)")
    else:
        weight_map: dict[str, str] = {}
        for number, names in enumerate(shards, start=1):
            file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            shard = {name: tensors[name] for name in names}
            save_file(shard, str(out_dir / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
            if progress is not None:
                written = sum(_nbytes(t) for t in shard.values()) / 1e9
                progress(f"wrote shard {number}/{len(shards)}: {file} ({written:.2f} GB)")
        index = {
            "metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
            "weight_map": weight_map,
        }
        (out_dir / WEIGHTS_INDEX_FILE).write_text(
            json.dumps(index, indent=2) + "\n", encoding="utf-8"
        )
    (out_dir / CONFIG_FILE).write_text(
        json.dumps(hf_config(model.shape, dtype), indent=2) + "\n", encoding="utf-8"
    )


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _find_tokenizer(state: dict[str, Any], override: Path | None) -> Path:
    """The tokenizer directory the run used; its tokenizer.json must hash as training saw it."""
    stored = state.get("tokenizer_dir")
    if override is None and not stored:
        raise CheckpointError(
            "the checkpoint does not name its tokenizer directory: pass --tokenizer DIR"
        )
    directory = Path(override if override is not None else stored)
    if not (directory / "tokenizer.json").is_file():
        hint = "" if override is not None else " (stored in the checkpoint): pass --tokenizer DIR"
        raise CheckpointError(f"no tokenizer.json in tokenizer directory {directory}{hint}")
    expected = state.get("tokenizer_hash")
    if expected and sha256_file(directory / "tokenizer.json") != expected:
        raise CheckpointError(
            f"tokenizer {directory} is not the one this run was trained with (hash mismatch): "
            "pass the right one with --tokenizer DIR"
        )
    return directory


def _copy_tokenizer(tokenizer_dir: Path, out_dir: Path, shape: ModelShape) -> None:
    """Copy the tokenizer files; model_max_length becomes the model's position count."""
    for name in TOKENIZER_FILES:
        source = tokenizer_dir / name
        if not source.is_file():
            continue
        if name == "tokenizer_config.json":
            config = json.loads(source.read_text(encoding="utf-8"))
            config["model_max_length"] = shape.max_seq_len
            text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
            (out_dir / name).write_text(text, encoding="utf-8")
        else:
            shutil.copyfile(source, out_dir / name)


def _check_out_dir(out_dir: Path, checkpoint: Path, force: bool) -> None:
    """Refuse to overwrite anything but an earlier export, and only with --force."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"--out {out_dir} exists and is not a directory")
    if checkpoint.resolve().is_relative_to(out_dir.resolve()):
        raise CheckpointError(f"--out {out_dir} contains the checkpoint: choose another directory")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not force:
        raise CheckpointError(f"--out {out_dir} is not empty: pass --force to replace it")
    if not (out_dir / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"--out {out_dir} is not empty and not an earlier export (no {CONFIG_FILE}): "
            "refusing to replace it even with --force"
        )


def _model_shape(state: dict[str, Any], path: Path) -> ModelShape:
    stored = state.get("model_shape")
    names = {f.name for f in dataclasses.fields(ModelShape)}
    if not isinstance(stored, dict) or set(stored) != names:
        raise CheckpointError(
            f"{path / 'train_state.json'}: model_shape is missing or incomplete "
            f"(expected {', '.join(sorted(names))})"
        )
    return ModelShape(**stored)


def export_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    *,
    force: bool = False,
    tokenizer_dir: Path | None = None,
    dtype: str = "fp32",
    max_shard_bytes: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a Hugging Face directory for `checkpoint` (a step dir or a checkpoint root).

    `tokenizer_dir` overrides the directory stored in the checkpoint (for runs moved between
    machines); `dtype` and `max_shard_bytes` as in `write_hf_model`; `progress` gets a line per
    stage. Returns `out_dir`. Raises CheckpointError (a ConfigError) on user mistakes.
    """
    path = resolve_checkpoint(checkpoint)
    if progress is not None:  # 3.9B + LAMB state is ~47 GB to hash: a minute or more
        files = [f for f in path.rglob("*") if f.is_file()]
        size = sum(f.stat().st_size for f in files) / 1e9
        progress(f"verifying {path} ({len(files)} files, {size:.2f} GB)")
    check_intact(path)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, path, force)
    state = read_train_state(path)
    shape = _model_shape(state, path)
    tokenizer = _find_tokenizer(state, tokenizer_dir)
    model = build_model(shape)
    if progress is not None:
        progress(f"loading {path} ({count_parameters(model):,} parameters)")
    try:
        load_model_weights(path, model)
    except (OSError, RuntimeError) as error:  # missing file, or tensors of another size
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(f"cannot load the weights of {path}: {first}") from None
    broken = non_finite_tensor(model.state_dict().items())
    if broken is not None:
        raise CheckpointError(
            f"checkpoint {path} holds NaN or inf in {broken} (the run diverged): "
            "export an earlier checkpoint"
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir()
    try:
        write_hf_model(model, temp, dtype, max_shard_bytes, progress)
        _copy_tokenizer(tokenizer, temp, shape)
        header = f"# The run config stored in checkpoint {path.name} (step {state.get('step')}).\n"
        body = yaml.safe_dump(state.get("config", {}), sort_keys=False)
        (temp / RUN_CONFIG_FILE).write_text(header + body, encoding="utf-8")
        _replace_dir(temp, out_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(temp: Path, out_dir: Path) -> None:
    """Rename `temp` to `out_dir`; an existing (already checked) one is moved aside first."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.replace(temp, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    os.replace(out_dir, old)
    os.replace(temp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Import


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read {path}: {error}") from None


def check_hf_config(config: dict[str, Any], shape: ModelShape, source: Path) -> None:
    """Raise ConfigError naming the first field where an HF config.json and `shape` differ."""
    model_type = config.get("model_type")
    norm = {v: k for k, v in HF_MODEL_TYPE.items()}.get(str(model_type))
    if norm is None:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not BERT ('bert' or 'megatron-bert')"
        )
    if norm != shape.norm:
        raise ConfigError(
            f"{source} is a {model_type} model ({norm}-LN) but model.norm={shape.norm}: "
            f"set model.norm={norm}"
        )
    for hf_field, ours, key in _SHAPE_FIELDS:
        if config.get(hf_field) != getattr(shape, ours):
            raise ConfigError(
                f"{source}: {hf_field}={config.get(hf_field)} but {key}={getattr(shape, ours)}: "
                f"set {key}={config.get(hf_field)}"
            )
    fixed = {
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
    }
    for hf_field, value in fixed.items():
        if config.get(hf_field, value) != value:
            raise ConfigError(
                f"{source}: {hf_field}={config.get(hf_field)!r} is not supported "
                f"(our BERT has {hf_field}={value!r})"
            )
    eps = config.get("layer_norm_eps", LAYER_NORM_EPS)
    if not isinstance(eps, (int, float)) or not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-3):
        raise ConfigError(
            f"{source}: layer_norm_eps={eps} is not supported (our BERT uses {LAYER_NORM_EPS})"
        )


def _read_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: safetensors preferred, pytorch_model.bin accepted,
    each possibly sharded with an index file."""

    def load(file: Path) -> dict[str, torch.Tensor]:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        # Pickled weights: weights_only=True never runs code from the file (docs/design.md: trust).
        return torch.load(file, map_location="cpu", weights_only=True)

    for base in ("model.safetensors", "pytorch_model.bin"):
        index = hf_dir / f"{base}.index.json"
        try:
            if (hf_dir / base).is_file():
                return load(hf_dir / base)
            if index.is_file():
                files = sorted(set(_read_json(index)["weight_map"].values()))
                tensors: dict[str, torch.Tensor] = {}
                for name in files:
                    tensors.update(load(hf_dir / name))
                return tensors
        except (OSError, RuntimeError, KeyError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise ConfigError(f"cannot read the weights in {hf_dir}: {first}") from None
    raise ConfigError(f"{hf_dir} holds no model.safetensors or pytorch_model.bin")


def _normalise_hf_key(key: str) -> str:
    """HF names as BertForPreTraining has them: add the `bert.` prefix that a saved BertModel
    lacks, and rename TF-era LayerNorm gamma/beta to weight/bias."""
    if key.startswith(_HF_BASE_MODULES):
        key = "bert." + key
    for old, new in _LEGACY_SUFFIXES.items():
        if key.endswith(old):
            key = key[: -len(old)] + new
    return key


def load_hf_weights(hf_dir: Path, model: Bert) -> None:
    """Load a Hugging Face BERT directory into `model` (for `train.init_from`).

    Accepts what `write_hf_model` writes and what transformers saves for BertForPreTraining,
    BertForMaskedLM, BertModel (no `bert.` prefix) or a fine-tuned model, as safetensors or
    pytorch_model.bin. The encoder must be complete; heads that are absent (pooler, MLM
    transform and bias, pair head) keep the model's fresh initialisation. Other task heads
    (`classifier.*`, ...) are ignored. Call it before parallelising the model.
    """
    hf_dir = Path(hf_dir)
    shape = model.shape
    check_hf_config(_read_json(hf_dir / CONFIG_FILE), shape, hf_dir)
    tensors = {_normalise_hf_key(k): v for k, v in _read_hf_tensors(hf_dir).items()}
    if _MLM_BIAS[1] not in tensors and "cls.predictions.decoder.bias" in tensors:
        tensors[_MLM_BIAS[1]] = tensors["cls.predictions.decoder.bias"]  # older transformers

    state = model.state_dict()
    used: set[str] = set(_TIED_OR_BUFFERS)
    missing: list[str] = []
    for ours, theirs in hf_key_map(shape).items():
        if theirs in tensors:
            state[ours] = tensors[theirs]
            used.add(theirs)
        elif not ours.startswith(OPTIONAL_ON_IMPORT):
            missing.append(theirs)
    for ours, parts in qkv_key_map(shape).items():
        if all(part in tensors for part in parts):
            state[ours] = fuse_qkv(*(tensors[part] for part in parts), heads=shape.heads)
            used.update(parts)
        else:
            missing.extend(part for part in parts if part not in tensors)
    used.update(f"{_PAIR_HEAD[1]}.{p}" for p in _LINEAR)  # a pair head we have no use for
    if missing:
        raise ConfigError(f"{hf_dir} lacks {len(missing)} BERT weights, e.g. {missing[:3]}")
    unknown = sorted(k for k in tensors if k.startswith(("bert.", "cls.")) and k not in used)
    if unknown:
        raise ConfigError(
            f"{hf_dir} has weights our BERT has no place for, e.g. {unknown[:3]}: "
            "is it a BERT of another structure?"
        )
    expected = model.state_dict()
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ConfigError(
                f"{hf_dir}: tensor for {name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state)  # copies into the parameters, casting dtype and device


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bert-export",
        description="Write a Hugging Face directory (safetensors + config + tokenizer) for a "
        "pre-training checkpoint; load it with transformers' AutoModelForMaskedLM.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="a step directory (checkpoints/step_000123) or a checkpoint root (then its latest)",
    )
    parser.add_argument("--out", required=True, type=Path, help="directory to write")
    parser.add_argument("--force", action="store_true", help="replace an existing export in --out")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer directory (default: the one stored in the checkpoint)",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(EXPORT_DTYPES),
        default="fp32",
        help="dtype of the exported weights (bf16/fp16 halve the size; default fp32)",
    )
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help="split the weights into safetensors shards of at most this size, with "
        f"{WEIGHTS_INDEX_FILE} (e.g. 2GB, 500MB; default {DEFAULT_MAX_SHARD_SIZE})",
    )
    args = parser.parse_args(argv)

    def progress(line: str) -> None:
        print(f"bert-export: {line}", file=sys.stderr, flush=True)

    try:
        step_dir = resolve_checkpoint(args.checkpoint)
        out = export_checkpoint(
            step_dir,
            args.out,
            force=args.force,
            tokenizer_dir=args.tokenizer,
            dtype=args.dtype,
            max_shard_bytes=parse_size(args.max_shard_size),
            progress=progress,
        )
    except ConfigError as error:
        print(f"bert-export: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"bert-export: error: {error}", file=sys.stderr)
        return 1
    architecture = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))["architectures"]
    print(f"bert-export: wrote {out} ({architecture[0]}) from {step_dir}")
    print(
        f"bert-export: load it with transformers: AutoModelForMaskedLM.from_pretrained('{out}'), "
        f"AutoTokenizer.from_pretrained('{out}')"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
