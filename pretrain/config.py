"""Typed run configuration: YAML file + `key=value` overrides → validated `Config`.

Every config key lives here with its default and a docstring (docs/design.md, "Config").
Unknown keys and wrong types raise `ConfigError` with a message that names the key and says what
to do; the CLI prints it as one line. No interpolation, no registries: a YAML mapping per
section, a dataclass per section.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pretrain.blend import DataSource, parse_data_path


class ConfigError(ValueError):
    """A user mistake in the configuration; the message is shown as is."""


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts; `validate` checks every field that declares one."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    """True: `low` itself is refused (> low rather than >= low)."""
    high_open: bool = False
    """True: `high` itself is refused (< high rather than <= high)."""

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe(self) -> str:
        low = None if self.low is None else ("> " if self.low_open else ">= ") + f"{self.low:g}"
        high = None if self.high is None else ("< " if self.high_open else "<= ") + f"{self.high:g}"
        return " and ".join(part for part in (low, high) if part)


def ranged(
    default: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """A dataclass field with a default and its allowed range (None values are not checked)."""
    return field(default=default, metadata={"range": Range(low, high, low_open, high_open)})


# Sizes of docs/design.md: name -> (layers, hidden, heads). ffn_hidden defaults to 4 x hidden.
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 2),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
    "xlarge": (24, 2048, 32),
    "3.9b": (48, 2560, 40),
}


@dataclass
class ModelConfig:
    size: str | None = "tiny"
    """Named size (tiny|base|large|xlarge|3.9b); explicit fields below override it."""
    layers: int | None = ranged(None, 1)
    """Transformer layers; from model.size when unset."""
    hidden: int | None = ranged(None, 1)
    """Hidden width; from model.size when unset."""
    heads: int | None = ranged(None, 1)
    """Attention heads (must divide hidden); from model.size when unset."""
    ffn_hidden: int | None = ranged(None, 1)
    """Width of the MLP; 4 x hidden when unset."""
    vocab_size: int | None = ranged(None, 1)
    """Taken from the dataset's tokenizer when unset."""
    max_seq_len: int = ranged(512, 8)
    """Number of position embeddings."""
    norm: Literal["pre", "post", "auto"] = "auto"
    """pre = Megatron's rearranged LayerNorm; post = original BERT; auto = pre from xlarge up."""
    dropout: float = ranged(0.1, 0.0, 1.0, high_open=True)
    """Dropout probability of the embeddings, attention and MLP outputs."""


@dataclass
class MLMConfig:
    mode: Literal["dense", "sparse"] = "sparse"
    """sparse: loss on picked positions only; dense: loss on every non-special position. The
    defaults (sparse, 40%) are the best setting measured (docs/benchmarks.md, "Dense vs sparse
    MLM"); configs/xlarge.yaml and 3.9b.yaml choose dense MLM at 40%."""
    mask_rate: float = ranged(0.40, 0.0, 1.0, low_open=True, high_open=True)
    """Fraction of non-special tokens picked for prediction (80% [MASK], 10% random, 10% kept)."""
    visible_weight: float = ranged(0.1, 0.0)
    """Dense only: loss weight of positions that were not picked (picked positions weigh 1)."""
    visible_replace_rate: float = ranged(0.1, 0.0, 1.0, high_open=True)
    """Dense only: fraction of non-picked tokens replaced by a random token."""
    whole_word: bool = False
    """Pick whole words (all their word pieces) instead of single pieces."""
    pair_task: Literal["none", "nsp", "sop"] = "none"
    """Sentence-pair objective; none = RoBERTa-style packing of whole sentences."""


@dataclass
class DataConfig:
    path: str | list = ""
    """A directory written by `bert-prep encode`, or weight/path pairs to blend several:
    [0.7, runs/en/data, 0.3, runs/ja/data] (same tokenizer; deterministic and resumable)."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to DATA/tokenizer (bert-prep copies it there)."""
    seq_len: int = ranged(128, 8)
    """Tokens per sample, [CLS] and [SEP] included (at most model.max_seq_len)."""
    valid_fraction: float = ranged(0.01, 0.0, 1.0, high_open=True)
    """Fraction of documents held out for evaluation; 0 = no evaluation (also, with a warning,
    when the corpus has too few documents to hold any out)."""
    workers: int = ranged(1, 0)
    """DataLoader worker processes that assemble and mask batches."""

    @property
    def sources(self) -> tuple[DataSource, ...]:
        """`path` as typed (path, weight) entries: the one place `data.path` is parsed."""
        try:
            return parse_data_path(self.path)
        except ValueError as error:
            raise ConfigError(f"data.path: {error}") from None


@dataclass
class ParallelConfig:
    tp: int = ranged(1, 1)
    """Tensor-parallel degree; the data-parallel degree is world_size / tp."""
    zero: int = ranged(0, 0, 1)
    """1 = shard the optimizer state over the data-parallel ranks (ZeRO-1): gradients are
    reduced to the rank owning them and updated weights sent back, at plain DDP's wire volume."""
    grad_reduce_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """dtype in which data-parallel gradients cross the network; auto = fp16 under
    train.precision=fp16 (loss scaling keeps it in range), else fp32. fp16 needs
    train.precision=fp16; bf16 is allowed with any precision."""
    timeout_s: float = ranged(300.0, 0.0, low_open=True)
    """Collective timeout: a dead or hung rank stops the job after this long."""


@dataclass
class KernelsConfig:
    enabled: bool = True
    """Use fused kernels where the device has them (Triton on CUDA); false = reference paths."""


@dataclass
class TrainConfig:
    steps: int = ranged(1000, 1)
    """Optimizer steps of the whole run (the schedule decays to this step)."""
    micro_batch: int = ranged(32, 1)
    """Samples per rank per forward/backward."""
    global_batch: int = ranged(32, 1)
    """Samples per optimizer step over all ranks (the rest is gradient accumulation)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto = fp16 on GPUs below compute capability 8.0 (V100), bf16 from 8.0; on the CPU bf16
    where it has AVX512_BF16/AMX, else fp32. Resolved once at start-up; config.yaml and
    checkpoints record the result."""
    loss_scale_init: float = ranged(65536.0, 0.0, low_open=True)
    """fp16: the first loss scale (Megatron's initial_loss_scale)."""
    loss_scale_window: int = ranged(1000, 1)
    """fp16: steps without overflow before the scale doubles (Megatron's loss_scale_window)."""
    loss_scale_min: float = ranged(1.0, 0.0, low_open=True)
    """fp16: the scale never backs off below this; an overflow at it stops the run (Megatron's
    min_loss_scale)."""
    max_bad_steps: int = ranged(20, 1)
    """Stop (checkpoint, exit code 3) after this many steps in a row with a non-finite loss or
    gradient; such steps are never applied."""
    seed: int = ranged(1234, 0)
    """Seeds the weights, dropout, data order and masking (a resumed run keeps its own)."""
    resume: str = "auto"
    """auto = the newest intact checkpoint in checkpoint.dir if there is one; none = a new run
    (refused if the directory holds another run); start_over = a new run that first moves the
    previous one to OUT_DIR/previous-<time>/; or a checkpoint path."""
    resume_changes: Literal["refuse", "allow"] = "refuse"
    """allow = resume even though the data, sequence length, objective, optimizer, seed or
    global batch differ from the checkpoint's (each change is logged). Never the tokenizer or
    model shape: start from weights with init_from for that."""
    init_from: str | None = None
    """Weights to start from with a fresh schedule: our checkpoint or a Hugging Face BERT dir."""
    eval_every: int = ranged(200, 1)
    """Evaluate on the held-out batches every this many steps (and at the last step)."""
    eval_batches: int = ranged(10, 1)
    """Held-out micro-batches per evaluation (data.valid_fraction=0 turns evaluation off)."""
    log_every: int = ranged(10, 1)
    """Write a metrics.jsonl line every this many steps."""
    out_dir: str = "runs/default"
    """The run directory (config.yaml, metrics.jsonl, checkpoints/); it holds one run."""
    compile: bool = False
    """torch.compile the model (the first steps pay the compile time)."""
    allow_tf32: bool = True
    """fp32 matrix products and convolutions through TF32 tensor cores on GPUs of compute
    capability >= 8.0 (10-bit mantissa inputs, fp32 accumulation); no effect elsewhere."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: selective = attention core only, full = whole layers."""
    walltime_s: float | None = ranged(None, 0.0)
    """Checkpoint and exit with code 75 this long after start (for schedulers with no signal)."""
    comm_stats: bool = False
    """Count the bytes every collective moves and log them per step (`comm_bytes` in
    metrics.jsonl, by group and kind); costs a Python call per operator, so off by default."""
    device: str = "auto"
    """auto = cuda:<local_rank> when CUDA is available, else cpu."""
    wandb_project: str | None = None
    """Also log metrics to this Weights & Biases project (needs `pip install wandb`; the usual
    WANDB_* variables apply, e.g. WANDB_MODE=offline)."""
    skip_memory_check: bool = False
    """Start even when the memory estimate (bert-train --estimate-memory) exceeds the device's."""
    cluster: str | None = None
    """bert-plan's cluster (a built-in name such as abci2, or a cluster file) for the start-up
    line with the predicted memory and step time; unset = the built-in cluster of the detected
    GPU, if any."""


@dataclass
class OptimConfig:
    name: Literal["lamb", "adamw"] = "lamb"
    """LAMB (per-layer trust ratio, for large batches) or AdamW."""
    lr: float = ranged(1e-3, 0.0, low_open=True)
    """Peak learning rate, reached at the end of the warm-up."""
    warmup_steps: int = ranged(100, 0)
    """Linear warm-up from 0 to optim.lr over this many steps."""
    decay: Literal["poly", "linear", "cosine"] = "poly"
    """Decay after the warm-up, down to min_lr_ratio x lr at train.steps."""
    min_lr_ratio: float = ranged(0.0, 0.0, 1.0)
    """Final learning rate as a fraction of optim.lr."""
    power: float = ranged(1.0, 0.0, low_open=True)
    """Exponent of the polynomial decay (1.0 = linear)."""
    weight_decay: float = ranged(0.01, 0.0)
    """Decoupled weight decay (not applied to biases and LayerNorm weights)."""
    betas: tuple[float, float] = ranged((0.9, 0.999), 0.0, 1.0, high_open=True)
    """Adam/LAMB moment decay rates (each checked against the range)."""
    eps: float = ranged(1e-6, 0.0, low_open=True)
    """Added to the denominator of the Adam/LAMB update."""
    clip_grad: float = ranged(1.0, 0.0)
    """Global gradient-norm clip; 0 disables."""


@dataclass
class CheckpointConfig:
    dir: str | None = None
    """Defaults to OUT_DIR/checkpoints."""
    every: int = ranged(500, 1)
    """Write a checkpoint every this many steps (and at the end and on a stop request)."""
    keep: int = ranged(3, 1)
    """Complete checkpoints kept; older ones are deleted after each new one."""
    timeout_s: float = ranged(1800.0, 0.0, low_open=True)
    """How long the ranks wait for each other during a save (its own process group; a slow
    file system then fails the save, not the job); parallel.timeout_s is for training."""
    async_save: bool = False
    """Write periodic checkpoints in a background thread from a host copy of the state while
    training goes on (costs one copy of the rank's weights and optimizer state in host memory);
    the last save of a run is always waited for."""
    fail_on_error: bool = False
    """A periodic checkpoint that cannot be written ends the run; false: it is reported in one
    line, `latest` keeps naming the previous one, and training goes on. The last save of a run
    ends it with an error either way."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mlm: MLMConfig = field(default_factory=MLMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.train.out_dir) / "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check (and gently convert) one value against its field type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            choices = "|".join(str(a) for a in args)
            raise ConfigError(f"{key}={value!r} is not one of {choices}")
        return value
    if annotation is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{key} must be a list, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _merge(config: Config, data: dict[str, Any], source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for section_name, values in data.items():
        if section_name not in sections:
            raise ConfigError(
                f"{source}: unknown section '{section_name}' (known: {', '.join(sections)})"
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section_name}' must be a mapping")
        section = getattr(config, section_name)
        _set_fields(section, section_name, values, source)


def _set_fields(section: Any, section_name: str, values: dict[str, Any], source: str) -> None:
    hints = typing.get_type_hints(type(section))
    for key, value in values.items():
        full = f"{section_name}.{key}"
        if key not in hints:
            known = ", ".join(f"{section_name}.{k}" for k in hints)
            raise ConfigError(f"{source}: unknown key '{full}' (known: {known})")
        setattr(section, key, _coerce(value, hints[key], full))


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split `section.key=value`; the value is parsed as YAML (so 3, 1e-3, true, [a, b] work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    if key.count(".") != 1:
        raise ConfigError(f"override '{text}': the key must be section.key, e.g. train.steps=100")
    section, name = key.split(".")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return section, name, value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated Config from an optional YAML file and `key=value` overrides."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}".splitlines()[0]) from None
        _merge(config, data, str(path))
    for text in overrides:
        section, name, value = parse_override(text)
        _merge(config, {section: {name: value}}, "command line")
    validate(config)
    return config


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config stored in a checkpoint (already validated when it was written)."""
    config = Config()
    _merge(config, data, "stored config")
    return config


@dataclass(frozen=True)
class ModelShape:
    """The resolved architecture (size name expanded, vocabulary known)."""

    layers: int
    hidden: int
    heads: int
    ffn_hidden: int
    vocab_size: int
    max_seq_len: int
    norm: Literal["pre", "post"]
    dropout: float
    pair_head: bool


def resolve_model_shape(config: Config, vocab_size: int | None = None) -> ModelShape:
    m = config.model
    layers, hidden, heads = MODEL_SIZES.get(m.size or "", (None, None, None))
    layers = m.layers or layers
    hidden = m.hidden or hidden
    heads = m.heads or heads
    if layers is None or hidden is None or heads is None:
        raise ConfigError(
            "model: set model.size or all of model.layers, model.hidden and model.heads"
        )
    if hidden % heads:
        raise ConfigError(f"model.hidden={hidden} is not divisible by model.heads={heads}")
    vocab = m.vocab_size or vocab_size
    if vocab is None:
        raise ConfigError("model.vocab_size is unknown: set it or point data.path at a dataset")
    norm = m.norm
    if norm == "auto":
        norm = "pre" if hidden >= 2048 else "post"
    return ModelShape(
        layers=layers,
        hidden=hidden,
        heads=heads,
        ffn_hidden=m.ffn_hidden or 4 * hidden,
        vocab_size=vocab,
        max_seq_len=m.max_seq_len,
        norm=norm,
        dropout=m.dropout,
        pair_head=config.mlm.pair_task != "none",
    )


def _check_ranges(config: Config) -> None:
    """Every number must be finite and inside the Range its field declares."""
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for item in dataclasses.fields(values):
            value = getattr(values, item.name)
            key = f"{section.name}.{item.name}"
            allowed = item.metadata.get("range")
            for number in value if isinstance(value, tuple) else (value,):
                if not isinstance(number, (int, float)) or isinstance(number, bool):
                    continue
                if not math.isfinite(number):
                    raise ConfigError(f"{key}={value} must be a finite number")
                if allowed is not None and not allowed.contains(number):
                    raise ConfigError(f"{key}={value} must be {allowed.describe()}")


def validate(config: Config) -> None:
    """Field ranges (declared with each field), then cross-field checks; each message names
    the key and the fix."""
    _check_ranges(config)
    m, d, t = config.model, config.data, config.train
    if m.size is not None and m.size not in MODEL_SIZES:
        raise ConfigError(f"model.size={m.size!r} is not one of {'|'.join(MODEL_SIZES)}")
    for source in d.sources:  # parsing checks the blend's form
        if not source.path:
            raise ConfigError("data.path: a blend entry has an empty path")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}: "
            "raise model.max_seq_len or lower data.seq_len"
        )
    if t.loss_scale_init < t.loss_scale_min:
        raise ConfigError(
            f"train.loss_scale_init={t.loss_scale_init} is below train.loss_scale_min="
            f"{t.loss_scale_min}: raise the initial scale or lower the floor"
        )


def key_reference() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, docstring) of every config key, in definition order: what
    `bert-train --list-keys` prints. The docstrings are read from this file's source, where
    each one sits under its field."""
    docs: dict[str, dict[str, str]] = {}
    for node in ast.parse(Path(__file__).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef):
            fields = docs.setdefault(node.name, {})
            for item, after in zip(node.body, [*node.body[1:], None], strict=True):
                if (
                    isinstance(item, ast.AnnAssign)
                    and isinstance(item.target, ast.Name)
                    and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)
                ):
                    fields[item.target.id] = " ".join(after.value.value.split())
    config = Config()
    rows = []
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        hints = typing.get_type_hints(type(values))
        for item in dataclasses.fields(values):
            kind = str(hints[item.name]).replace("typing.", "")
            doc = docs.get(type(values).__name__, {}).get(item.name, "")
            rows.append((f"{section.name}.{item.name}", kind, getattr(values, item.name), doc))
    return rows


def check_batch_layout(config: Config, dp_size: int) -> int:
    """Gradient-accumulation steps; errors when micro-batch x dp does not divide global batch."""
    t = config.train
    per_step = t.micro_batch * dp_size
    if t.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch="
            f"{t.micro_batch} x dp_size={dp_size}: choose a global batch that is"
        )
    return t.global_batch // per_step


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config atomically (a full disk leaves the previous file, not an empty
    one)."""
    data = config.to_dict()
    data["optim"]["betas"] = list(data["optim"]["betas"])
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file, fsync, then rename over `path`; on failure remove the temp."""
    temp = path.with_name(f".{path.name}.tmp")
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as error:  # a failed write() names no file: name the one we meant
        temp.unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(path)) from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
