"""Parameter and optimizer-state bytes per rank at tp = 1, 2, 4 (and dp = 2 with ZeRO-1).

    .venv/bin/python -m bench.parallel_memory [--size base]

Builds the real shards of each tp rank (in one process: the layers are only sliced, never run)
and counts fp32 parameter bytes and LAMB state (two moments per parameter). The goal: the
sharded parts shrink as 1/tp; what stays is the replicated rest (LayerNorms, position and
token-type embeddings, pooler, MLM transform, row-parallel biases).
"""

from __future__ import annotations

import argparse

import torch

from pretrain.config import load_config, resolve_model_shape
from pretrain.distributed import ParallelDims
from pretrain.model import build_model
from pretrain.parallel.parallelize import apply_tensor_parallel, tp_sharded_names
from pretrain.parallel.zero import assign_owners


def rank_bytes(size: str, tp: int, tp_rank: int) -> tuple[int, int, list[torch.Tensor]]:
    torch.manual_seed(0)
    shape = resolve_model_shape(load_config(None, [f"model.size={size}"]), vocab_size=30522)
    model = build_model(shape)
    dims = ParallelDims(tp, tp_rank, tp, 1, tp_rank, 0, None, None, torch.device("cpu"))
    apply_tensor_parallel(model, dims)
    sharded = tp_sharded_names(model) if tp > 1 else set()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    shard_bytes = sum(p.numel() * 4 for n, p in trained if n in sharded)
    rest_bytes = sum(p.numel() * 4 for n, p in trained if n not in sharded)
    return shard_bytes, rest_bytes, [p for _, p in trained]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="base")
    args = parser.parse_args()
    mib = 2**20
    print(f"model.size={args.size}, vocab 30522, fp32 parameters, LAMB (2 moments)")
    print(
        "| tp | sharded params MiB | replicated MiB | params MiB/rank | vs tp=1 | "
        "optimizer MiB/rank | ZeRO-1 dp=2 optimizer MiB/rank |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for tp in (1, 2, 4):
        shard, rest, params = rank_bytes(args.size, tp, 0)
        total = shard + rest
        base = base or total
        owners = assign_owners(params, 2)
        zero = max(
            sum(p.numel() * 8 for p, o in zip(params, owners, strict=True) if o == d)
            for d in (0, 1)
        )
        print(
            f"| {tp} | {shard / mib:.1f} | {rest / mib:.1f} | {total / mib:.1f} | "
            f"{total / base:.3f} | {2 * total / mib:.1f} | {zero / mib:.1f} |"
        )


if __name__ == "__main__":
    main()
