"""`bert-train --config FILE [section.key=value ...]` (also `python -m pretrain`).

Examples:
    bert-train --config configs/tiny.yaml data.path=runs/demo/data train.steps=200
    bert-train --config configs/base.yaml train.precision=bf16 train.resume=auto
    bert-train --selftest        # first job on a new node: PASS/FAIL per check, exit 0 if all pass
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from data_prep.errors import PrepError
from launch.errors import LaunchError
from pretrain.config import ConfigError, load_config
from pretrain.rank_tag import install, rank_tag


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bert-train",
        description="Pre-train BERT (dense or sparse MLM) from data prepared by bert-prep.",
        epilog=(
            "Every config key can be overridden as section.key=value, e.g. train.steps=1000 "
            "mlm.mode=sparse optim.lr=2e-3. Keys: --list-keys (each with its meaning), "
            "--print-config (the resolved values), docs/design.md. "
            "Exit code 75 means: checkpointed and stopped on request, resubmit to continue; "
            "3 means: diverged (non-finite losses or gradients), stopped with a checkpoint of "
            "the last finite state."
        ),
    )
    parser.add_argument("--config", help="YAML config file (e.g. configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument(
        "--list-keys",
        action="store_true",
        help="list every config key with its type, default and meaning, and exit",
    )
    parser.add_argument(
        "--selftest",
        action="store_true",
        help="check this node (precision auto picks, kernels, all-reduce, tp 1 vs tp 2) and exit",
    )
    parser.add_argument(
        "--estimate-memory",
        action="store_true",
        help="print the estimated per-GPU memory of this config and layout, term by term, and "
        "exit (model.vocab_size defaults to 32768 here)",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=1,
        metavar="N",
        help="with --estimate-memory: number of ranks (dp = N / parallel.tp; default 1)",
    )
    parser.add_argument(
        "--gpu-memory-gib",
        type=float,
        metavar="GIB",
        help="with --estimate-memory: the GPU's memory in GiB as CUDA reports it (16 GB V100: "
        "15.78); exit 1 when the estimate does not fit",
    )
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        metavar="N",
        help="this process's rank on its node, as deepspeed's launcher passes it; the same as "
        "the LOCAL_RANK variable, which it sets when the launcher did not",
    )
    return parser


def _take_local_rank(local_rank: int | None) -> None:
    """`--local_rank=N` (deepspeed's launcher, torch.distributed.launch) is LOCAL_RANK."""
    if local_rank is None:
        return
    exported = os.environ.get("LOCAL_RANK")
    if exported is not None and exported != str(local_rank):
        raise ConfigError(
            f"--local_rank={local_rank} but LOCAL_RANK={exported}: the launcher and the "
            "environment disagree; pass one of them"
        )
    os.environ["LOCAL_RANK"] = str(local_rank)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tag = rank_tag()  # "[rank R host H] " on ranks other than 0, so a user sees who failed
    install(tag)
    if args.selftest:
        from pretrain.selftest import run_selftest

        return run_selftest()
    if args.list_keys:
        from pretrain.config import key_reference

        lines = [f"{k} ({kind}, default {d!r})\n    {doc}" for k, kind, d, doc in key_reference()]
        try:
            print("\n".join(lines))
        except BrokenPipeError:  # `bert-train --list-keys | head`: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    try:
        _take_local_rank(args.local_rank)
        config = load_config(args.config, args.overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return 0
        if args.estimate_memory:
            from pretrain.memory import print_estimate

            return print_estimate(config, args.world_size, args.gpu_memory_gib)
        from pretrain.trainer import main_train

        return main_train(config)
    except (ConfigError, PrepError, LaunchError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"{tag}bert-train: error: {message}", file=sys.stderr)
        return 2
    except torch.distributed.DistError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(
            f"{tag}bert-train: error: a collective failed or timed out (did another rank die "
            f"or hang? see parallel.timeout_s): {first}",
            file=sys.stderr,
        )
        return 1
    except OSError as error:  # a full disk, an unwritable directory, a missing file
        print(f"{tag}bert-train: error: {describe_os_error(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{tag}bert-train: interrupted", file=sys.stderr)
        return 130


def describe_os_error(error: OSError) -> str:
    """One line naming the path and the reason, e.g. `cannot write runs/x/config.yaml: No space
    left on device`."""
    reason = error.strerror or str(error).splitlines()[0] or type(error).__name__
    if error.filename is None:
        return reason
    return f"{error.filename}: {reason} (check the path, its permissions and free space)"


if __name__ == "__main__":
    sys.exit(main())
