"""Config parsing and validation: the oracle is docs/design.md's list of keys and error rules."""

from pathlib import Path

import pytest

from pretrain.config import (
    ConfigError,
    check_batch_layout,
    load_config,
    resolve_model_shape,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_and_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\noptim:\n  lr: 2e-3\n")
    config = load_config(
        path, ["mlm.mode=sparse", "train.precision=fp32", "optim.betas=[0.8, 0.9]"]
    )
    assert config.train.steps == 7
    assert config.optim.lr == pytest.approx(2e-3)
    assert config.mlm.mode == "sparse"
    assert config.optim.betas == (0.8, 0.9)


def test_a_config_without_mlm_section_gets_the_measured_best(tmp_path):
    """No mlm: section means sparse MLM at 40% masking, what configs/tiny.yaml chooses from the
    small-batch measurements (it was dense at 15%, the worst measured); base and large, whose
    batches are large, take dense MLM at 40%, the best measured at a large batch with LAMB
    (issue 21), as xlarge and 3.9b do."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n")
    default = load_config(path, []).mlm
    assert (default.mode, default.mask_rate) == ("sparse", 0.40)
    assert load_config(CONFIGS / "tiny.yaml", []).mlm == default
    for name in ("base", "large", "xlarge", "3.9b"):
        mlm = load_config(CONFIGS / f"{name}.yaml", []).mlm
        dense = (mlm.mode, mlm.mask_rate, mlm.visible_weight, mlm.visible_replace_rate)
        assert dense == ("dense", 0.40, 0.1, 0.1), name


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.stepz=3", "unknown key 'train.stepz'"),
        ("nosuch.key=3", "unknown section 'nosuch'"),
        ("train.steps=many", "train.steps must be an integer"),
        ("mlm.mode=both", "mlm.mode='both' is not one of dense|sparse"),
        ("train.compile=maybe", "train.compile must be true or false"),
        ("data.seq_len=1024", "exceeds model.max_seq_len"),
        ("model.size=huge", "model.size='huge'"),
        ("steps=3", "section.key"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_batch_layout_must_divide():
    config = load_config(None, ["train.micro_batch=8", "train.global_batch=32"])
    assert check_batch_layout(config, dp_size=2) == 2
    config = load_config(None, ["train.micro_batch=8", "train.global_batch=36"])
    with pytest.raises(ConfigError, match="not a multiple"):
        check_batch_layout(config, dp_size=1)


def test_model_shape_resolution():
    config = load_config(None, ["model.size=xlarge"])
    shape = resolve_model_shape(config, vocab_size=32000)
    assert (shape.layers, shape.hidden, shape.heads, shape.ffn_hidden) == (24, 2048, 32, 8192)
    assert shape.norm == "pre"  # auto: pre-LN from xlarge up
    assert resolve_model_shape(load_config(None, ["model.size=base"]), 30522).norm == "post"
    with pytest.raises(ConfigError, match="not divisible"):
        resolve_model_shape(load_config(None, ["model.hidden=100", "model.heads=3"]), 100)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.loss_scale_init=nan", "train.loss_scale_init=nan must be a finite number"),
        ("train.loss_scale_init=0", "train.loss_scale_init=0.0 must be > 0"),
        ("train.loss_scale_min=inf", "train.loss_scale_min=inf must be a finite number"),
        ("train.loss_scale_min=1e6", "is below train.loss_scale_min"),
        ("train.loss_scale_window=0", "train.loss_scale_window=0 must be >= 1"),
        ("train.max_bad_steps=0", "train.max_bad_steps=0 must be >= 1"),
        ("train.precision=fp8", "train.precision='fp8' is not one of auto|fp32|bf16|fp16"),
    ],
)
def test_loss_scaling_keys_are_validated(override, fragment):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert fragment in str(error.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.layers=-1", "model.layers=-1 must be >= 1"),
        ("model.dropout=5", "model.dropout=5.0 must be >= 0 and < 1"),
        ("train.eval_batches=0", "train.eval_batches=0 must be >= 1"),
        ("train.eval_batches=-3", "train.eval_batches=-3 must be >= 1"),
        ("data.workers=-1", "data.workers=-1 must be >= 0"),
        ("optim.warmup_steps=-5", "optim.warmup_steps=-5 must be >= 0"),
        ("optim.lr=nan", "optim.lr=nan must be a finite number"),
        ("optim.clip_grad=.inf", "optim.clip_grad=inf must be a finite number"),
        ("optim.betas=[0.9, 1.5]", "optim.betas=(0.9, 1.5) must be >= 0 and < 1"),
        ("train.walltime_s=-1", "train.walltime_s=-1.0 must be >= 0"),
        ("parallel.timeout_s=0", "parallel.timeout_s=0.0 must be > 0"),
        ("mlm.mask_rate=1", "mlm.mask_rate=1.0 must be > 0 and < 1"),
    ],
)
def test_out_of_range_numbers_are_refused(override, fragment):
    """Oracle: the Range each field declares; before it, all of these were accepted."""
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert fragment in str(error.value)


def test_every_shipped_config_leaves_precision_to_auto():
    """Oracle: the issue — `auto` is the default and what every shipped config says."""
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert configs
    assert load_config(None).train.precision == "auto"
    for path in configs:
        assert load_config(path).train.precision == "auto", path


def test_every_numeric_field_declares_a_range():
    """A new numeric key without a Range would silently accept nonsense again."""
    import dataclasses
    import typing

    from pretrain.config import Config

    config = Config()
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        hints = typing.get_type_hints(type(values))
        for item in dataclasses.fields(values):
            numeric = {int, float} & set(typing.get_args(hints[item.name]) or (hints[item.name],))
            if numeric and hints[item.name] is not bool:
                assert "range" in item.metadata, f"{section.name}.{item.name} has no Range"


def test_list_keys_documents_every_key():
    """Oracle: the Config dataclasses themselves; `bert-train --list-keys` names every key with
    a non-empty meaning (each field's docstring), in the order they are defined."""
    import dataclasses

    from pretrain.__main__ import main
    from pretrain.config import Config, key_reference

    config = Config()
    keys = [
        f"{section.name}.{item.name}"
        for section in dataclasses.fields(config)
        for item in dataclasses.fields(getattr(config, section.name))
    ]
    rows = key_reference()
    assert [row[0] for row in rows] == keys
    assert all(doc for _, _, _, doc in rows), [key for key, _, _, doc in rows if not doc]
    assert dict((k, d) for k, _, d, _ in rows)["train.precision"] == "auto"
    assert main(["--list-keys"]) == 0
