"""Our pre-training vs Hugging Face's BertForMaskedLM on identical batches: held-out curves.

Run from the repository root (two 800-step runs, about 5 + 10 minutes on one idle core):

    .venv/bin/python -m bench.learning_vs_hf
    .venv/bin/python -m bench.learning_vs_hf --steps 400 --data runs/bench/learning/data

Why: when a tiny model stalls near the word-frequency plateau, this tells a bug in our model,
loss or data path from what the recipe itself gives. Both runs see the same configs/tiny.yaml
shape, the same micro-batches (our data pipeline: sparse MLM, 15% picked, 80/10/10), AdamW
(lr 1e-3, weight decay 0.01 on matrices only, eps 1e-6, 10% warm-up, linear decay, clip 1.0),
bf16 autocast, one thread, and are scored on the same held-out masked positions (EVAL_MLM,
4 x 32 samples). Ours trains through `pretrain.trainer.train`; the reference is
transformers' BertForMaskedLM (its own initialisation, embeddings, attention, MLM head and
loss) in a plain loop. Only the random initial weights differ, so the curves should agree to
within seed noise. The data is the 8000-piece WordPiece encoding of the shared Gutenberg corpus
made by bench.learning_efficiency (prepared into --data if missing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny.yaml"
CORPUS = REPO.parent / "shared" / "data" / "gutenberg-en" / "clean_all.txt.gz"
SEED = 1
VALID_FRACTION = 0.08
MLM = ["mlm.mode=sparse", "mlm.mask_rate=0.15"]  # both sides draw their batches with these


def ours(data_dir: Path, out_dir: Path, steps: int, eval_every: int) -> dict[int, tuple]:
    from pretrain.config import load_config
    from pretrain.trainer import train

    config = load_config(
        CONFIG,
        [
            f"data.path={data_dir}",
            f"data.valid_fraction={VALID_FRACTION}",
            f"train.steps={steps}",
            f"train.seed={SEED}",
            "train.resume=start_over",
            f"train.eval_every={eval_every}",
            "train.eval_batches=4",
            f"train.out_dir={out_dir}",
            f"checkpoint.every={steps}",
            "checkpoint.keep=1",
            *MLM,
            "optim.name=adamw",
            "optim.lr=1e-3",
            f"optim.warmup_steps={steps // 10}",
            "optim.decay=poly",
            "optim.power=1.0",
        ],
    )
    result = train(config)
    if result.exit_code != 0:
        raise SystemExit(f"our run failed (exit code {result.exit_code})")
    return {row["step"]: (row["masked_loss"], row["mlm_acc"]) for row in result.evals}


def reference(data_dir: Path, steps: int, eval_every: int) -> dict[int, tuple]:
    from transformers import BertConfig, BertForMaskedLM

    from pretrain.config import load_config, resolve_model_shape
    from pretrain.data import StreamBatches, build_loader, eval_batches, open_training_data

    config = load_config(CONFIG, [f"data.path={data_dir}", *MLM])
    data = open_training_data(
        config.data.sources, None, config.data.seq_len, VALID_FRACTION, config.mlm, SEED
    )
    shape = resolve_model_shape(config, data.dataset.vocab_size)
    torch.manual_seed(SEED)
    model = BertForMaskedLM(
        BertConfig(
            vocab_size=shape.vocab_size,
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            intermediate_size=shape.ffn_hidden,
            max_position_embeddings=shape.max_seq_len,
        )
    )
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.01}, {"params": vectors, "weight_decay": 0.0}],
        lr=1e-3,
        eps=1e-6,
    )
    warmup = steps // 10
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else (steps - s) / (steps - warmup)
    )
    micro = config.train.micro_batch
    batches = iter(build_loader(data.train, StreamBatches(0, micro, micro, 0, 1), 0))
    held_out = eval_batches(data.valid, micro, 4)

    @torch.no_grad()
    def evaluate() -> tuple[float, float]:
        model.eval()
        loss = correct = count = 0.0
        for batch in held_out:
            inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(**inputs).logits.float()
            picked = batch["picked"]
            labels, logits = batch["labels"][picked], logits[picked]
            loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += float((logits.argmax(-1) == labels).sum())
            count += labels.numel()
        model.train()
        return loss / count, correct / count

    curve = {}
    for step in range(1, steps + 1):
        batch = next(batches)
        inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask", "labels")}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % eval_every == 0:
            curve[step] = evaluate()
            print(f"[hf] step {step}: held-out masked {curve[step][0]:.4f}", flush=True)
    return curve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.learning_vs_hf",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "bench" / "learning_vs_hf")
    parser.add_argument("--data", type=Path, help="prepared data (default CACHE/data)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data_dir = args.data
    if data_dir is None:
        if not CORPUS.is_file():
            parser.error(f"shared data not found: {CORPUS}")
        from bench.learning_efficiency import prepare

        data_dir = prepare(CORPUS, args.cache, 8000)
    mine = ours(data_dir.resolve(), args.cache / "ours", args.steps, args.eval_every)
    theirs = reference(data_dir.resolve(), args.steps, args.eval_every)
    print("\n| step | ours masked loss | HF masked loss | ratio | ours acc | HF acc |")
    print("|---:|---:|---:|---:|---:|---:|")
    for step in sorted(theirs):
        (ml, ma), (hl, ha) = mine[step], theirs[step]
        print(f"| {step} | {ml:.4f} | {hl:.4f} | {ml / hl:.4f} | {ma:.3f} | {ha:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
