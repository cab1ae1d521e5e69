"""Typed run configuration: YAML file + `key=value` overrides → validated `Config`.

Every key of DESIGN.md lives here with its default. Unknown keys and wrong types raise
`ConfigError` with a message that names the key and says what to do; the CLI prints it as one
line. No interpolation, no registries: a YAML mapping per section, a dataclass per section.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pretrain.blend import parse_blend_spec


class ConfigError(ValueError):
    """A user mistake in the configuration; the message is shown as is."""


# Sizes of DESIGN.md: name -> (layers, hidden, heads). ffn_hidden defaults to 4 x hidden.
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
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    ffn_hidden: int | None = None
    """Width of the MLP; 4 x hidden when unset."""
    vocab_size: int | None = None
    """Taken from the dataset's tokenizer when unset."""
    max_seq_len: int = 512
    """Number of position embeddings."""
    norm: Literal["pre", "post", "auto"] = "auto"
    """pre = Megatron's rearranged LayerNorm; post = original BERT; auto = pre from xlarge up."""
    dropout: float = 0.1


@dataclass
class MLMConfig:
    mode: Literal["dense", "sparse"] = "dense"
    """sparse: loss on picked positions only; dense: loss on every non-special position."""
    mask_rate: float = 0.15
    """Fraction of non-special tokens picked for prediction (80% [MASK], 10% random, 10% kept)."""
    visible_weight: float = 0.1
    """Dense only: loss weight of positions that were not picked (picked positions weigh 1)."""
    visible_replace_rate: float = 0.1
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
    seq_len: int = 128
    valid_fraction: float = 0.01
    """Fraction of documents held out for evaluation."""
    workers: int = 1
    """DataLoader worker processes that assemble and mask batches."""


@dataclass
class ParallelConfig:
    tp: int = 1
    zero: int = 0
    timeout_s: float = 300.0
    """Collective timeout: a dead or hung rank stops the job after this long."""


@dataclass
class KernelsConfig:
    enabled: bool = True
    """Use fused kernels where the device has them (Triton on CUDA); false = reference paths."""


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch: int = 32
    global_batch: int = 32
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    seed: int = 1234
    resume: str = "auto"
    """auto = latest checkpoint in checkpoint.dir if there is one; none; or a checkpoint path."""
    init_from: str | None = None
    """Weights to start from with a fresh schedule: our checkpoint or a Hugging Face BERT dir."""
    eval_every: int = 200
    eval_batches: int = 10
    log_every: int = 10
    out_dir: str = "runs/default"
    compile: bool = False
    recompute: Literal["none", "selective", "full"] = "none"
    walltime_s: float | None = None
    """Checkpoint and exit with code 75 this long after start (for schedulers with no signal)."""
    comm_stats: bool = False
    """Count the bytes every collective moves and log them per step (`comm_bytes` in
    metrics.jsonl, by group and kind); costs a Python call per operator, so off by default."""
    device: str = "auto"
    """auto = cuda:<local_rank> when CUDA is available, else cpu."""
    skip_memory_check: bool = False
    """Start even when the memory estimate (bert-train --estimate-memory) exceeds the device's."""


@dataclass
class OptimConfig:
    name: Literal["lamb", "adamw"] = "lamb"
    lr: float = 1e-3
    warmup_steps: int = 100
    decay: Literal["poly", "linear", "cosine"] = "poly"
    min_lr_ratio: float = 0.0
    power: float = 1.0
    """Exponent of the polynomial decay (1.0 = linear)."""
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables."""


@dataclass
class CheckpointConfig:
    dir: str | None = None
    """Defaults to OUT_DIR/checkpoints."""
    every: int = 500
    keep: int = 3


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


def validate(config: Config) -> None:
    """Cross-field checks; each message names the key and the fix."""
    m, t, mlm, d = config.model, config.train, config.mlm, config.data
    if m.size is not None and m.size not in MODEL_SIZES:
        raise ConfigError(f"model.size={m.size!r} is not one of {'|'.join(MODEL_SIZES)}")
    if not 0.0 < mlm.mask_rate < 1.0:
        raise ConfigError(f"mlm.mask_rate={mlm.mask_rate} must be between 0 and 1")
    if not 0.0 <= mlm.visible_replace_rate < 1.0:
        raise ConfigError("mlm.visible_replace_rate must be in [0, 1)")
    if mlm.visible_weight < 0:
        raise ConfigError("mlm.visible_weight must be >= 0")
    if d.path:
        try:
            parse_blend_spec(d.path)
        except ValueError as error:
            raise ConfigError(f"data.path: {error}") from None
    if not 0.0 <= d.valid_fraction < 1.0:
        raise ConfigError("data.valid_fraction must be in [0, 1)")
    if d.seq_len < 8:
        raise ConfigError(f"data.seq_len={d.seq_len} is too short (minimum 8)")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}: "
            "raise model.max_seq_len or lower data.seq_len"
        )
    for key in ("steps", "micro_batch", "global_batch", "log_every", "eval_every"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"train.{key} must be positive")
    if config.parallel.tp < 1:
        raise ConfigError("parallel.tp must be >= 1")
    if config.parallel.zero not in (0, 1):
        raise ConfigError("parallel.zero must be 0 or 1")
    if config.checkpoint.every <= 0 or config.checkpoint.keep <= 0:
        raise ConfigError("checkpoint.every and checkpoint.keep must be positive")
    if config.optim.lr <= 0:
        raise ConfigError("optim.lr must be positive")


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
    data = config.to_dict()
    data["optim"]["betas"] = list(data["optim"]["betas"])
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
