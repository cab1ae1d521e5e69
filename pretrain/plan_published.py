"""Published BERT pre-training throughputs: one per GPU kind fits the planner's efficiency, the
rest check it.

Every figure is NVIDIA's BERT-Large (24 layers, hidden 1024, 16 heads, post-LN, vocabulary 30522
padded to 30528, sparse MLM with at most 20 predictions per 128 tokens and 80 per 512, NSP,
LAMB, mixed precision fp16, no activation recomputation, data parallel only) from the "Training
performance results" tables of NVIDIA DeepLearningExamples, PyTorch/LanguageModeling/BERT/
README.md:

- "21.11": the version measured in the pytorch:21.11-py3 container (DGX A100 8 x A100 80GB and
  DGX-1 8 x V100 32G tables, and the DGX A100 multi-node scaling table). Micro-batch = the
  accumulated batch per GPU / accumulation steps, both from the table.
- "19.07": the older version measured in pytorch:19.07-py3 on DGX-1 8 x V100 16G (single node
  and multi-node). Its throughput tables give only the batch per GPU; the accumulation steps are
  those of the same README's pre-training loss table for that node count (512 / 1024 on one
  node, 128 / 256 on 4, 32 / 64 on 16, for sequence length 128 / 512), assumed to hold for the
  throughput runs.

Nodes: DGX-1 = 8 V100 SXM2, NVLink (150 GB/s one way per GPU), 4 x InfiniBand EDR (50 GB/s one
way); DGX A100 = 8 A100 SXM4 80GB, NVSwitch (300 GB/s), 8 x HDR 200 Gbit/s for compute
(200 GB/s) (NVIDIA DGX-1 and DGX A100 datasheets).

Fitted (one per kind): V100 on 21.11 DGX-1 32G, 8 GPUs, sequence length 128 (1,746 sequences/s);
A100 on 21.11 DGX A100, 8 GPUs, sequence length 128 (4,591 sequences/s). H100 and H200 have no
published figure of this kind: they use the A100 efficiency against their own peak, not checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from pretrain.config import ModelShape
from pretrain.devices import MEMORY_GB_PER_S, PEAK_TFLOPS
from pretrain.memory import Layout
from pretrain.plan_model import Rates, step_time

BERT_LARGE = ModelShape(
    layers=24,
    hidden=1024,
    heads=16,
    ffn_hidden=4096,
    vocab_size=30528,
    max_seq_len=512,
    norm="post",
    dropout=0.1,
    pair_head=True,
)
PREDICTIONS_PER_TOKEN = 20 / 128  # max_predictions_per_seq 20 at 128 and 80 at 512
NODES = {  # (NVLink GB/s per GPU, network GB/s per node), one direction
    "DGX-1": (150.0, 50.0),
    "DGX A100": (300.0, 200.0),
}


@dataclass(frozen=True)
class Published:
    source: str
    node: str
    gpu: str
    """pretrain/devices.py's kind."""
    nodes: int
    gpus: int
    """GPUs per node used."""
    seq_len: int
    micro_batch: int
    accumulation: int
    sequences_per_s: float
    fitted: bool = False


def _a100(
    nodes: int, gpus: int, seq: int, accumulation: int, rate: float, fit: bool = False
) -> Published:
    micro_batch = 256 if seq == 128 else 32
    node = "DGX A100"
    return Published(
        "21.11", node, "A100-80GB", nodes, gpus, seq, micro_batch, accumulation, rate, fit
    )


def _v100(
    source: str, gpus: int, seq: int, micro: int, acc: int, rate: float, nodes: int = 1
) -> Published:
    fit = source == "21.11" and gpus == 8 and seq == 128
    return Published(source, "DGX-1", "V100-SXM2", nodes, gpus, seq, micro, acc, rate, fit)


FIGURES: tuple[Published, ...] = (
    _a100(1, 8, 128, 32, 4591, fit=True),
    _a100(1, 1, 128, 32, 580),
    _a100(1, 1, 512, 128, 210),
    _a100(1, 8, 512, 128, 1657),
    _a100(2, 8, 128, 16, 9191),
    _a100(4, 8, 128, 8, 18119),
    _a100(8, 8, 128, 4, 35774),
    _a100(16, 8, 128, 2, 70555),
    _a100(32, 8, 128, 1, 138294),
    _a100(2, 8, 512, 64, 3291),
    _a100(4, 8, 512, 32, 6464),
    _a100(8, 8, 512, 16, 13005),
    _a100(16, 8, 512, 8, 25570),
    _a100(32, 8, 512, 4, 49663),
    _v100("21.11", 8, 128, 64, 64, 1746),
    _v100("21.11", 1, 128, 64, 64, 224),
    _v100("21.11", 1, 512, 8, 256, 75),
    _v100("21.11", 8, 512, 8, 256, 586),
    _v100("19.07", 1, 128, 16, 512, 125.44),
    _v100("19.07", 4, 128, 16, 512, 458.24),
    _v100("19.07", 8, 128, 16, 512, 919.04),
    _v100("19.07", 1, 512, 4, 1024, 26.64),
    _v100("19.07", 4, 512, 4, 1024, 98.24),
    _v100("19.07", 8, 512, 4, 1024, 194.56),
    _v100("19.07", 8, 128, 16, 128, 3089.76, nodes=4),
    _v100("19.07", 8, 128, 16, 32, 12144.64, nodes=16),
    _v100("19.07", 8, 512, 4, 256, 700.16, nodes=4),
    _v100("19.07", 8, 512, 4, 64, 2746.368, nodes=16),
)

# Which fitted kind each GPU kind takes its efficiency from.
FITTED_ON = {
    "V100-SXM2": "V100-SXM2",
    "A100-40GB": "A100-80GB",
    "A100-80GB": "A100-80GB",
    "H100-SXM": "A100-80GB",
    "H200": "A100-80GB",
}
CHECKED = ("V100-SXM2", "A100-40GB", "A100-80GB")


def gpu_rates(
    kind: str, precision: str, nvlink_gb: float, network_gb: float, efficiency: float
) -> Rates:
    """Rates of a GPU kind from the datasheet tables of pretrain/devices.py."""
    matmul = "fp32" if precision == "fp32" else precision
    return Rates(
        peak_flops=PEAK_TFLOPS[kind][matmul] * 1e12,
        efficiency=efficiency,
        memory_bytes_per_s=MEMORY_GB_PER_S[kind] * 1e9,
        link_bytes_per_s=nvlink_gb * 1e9,
        network_bytes_per_s=network_gb * 1e9,
    )


def predict(figure: Published, efficiency: float) -> float:
    """Predicted sequences per second of a published run at `efficiency`."""
    nvlink, network = NODES[figure.node]
    rates = gpu_rates(figure.gpu, "fp16", nvlink, network, efficiency)
    world = figure.nodes * figure.gpus
    layout = Layout(
        seq_len=figure.seq_len,
        micro_batch=figure.micro_batch,
        dp=world,
        precision="fp16",
        mlm_mode="sparse",
        mask_rate=PREDICTIONS_PER_TOKEN,
        accumulation=figure.accumulation,
    )
    # NVIDIA's BERT runs its MLM head in fp16 (ours runs the decoder in fp32).
    seconds = step_time(BERT_LARGE, layout, rates, figure.gpus).total
    return figure.micro_batch * figure.accumulation * world / seconds


@cache
def fitted_efficiency(kind: str) -> float:
    """The efficiency of `kind` at which the model reproduces its one fitted figure
    (bisection: the predicted throughput rises with the efficiency)."""
    source = FITTED_ON[kind]
    figure = next(f for f in FIGURES if f.fitted and f.gpu == source)
    low, high = 1e-3, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if predict(figure, middle) < figure.sequences_per_s:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def check_table() -> list[dict[str, object]]:
    """Every published figure with its prediction and error (docs/benchmarks.md's table)."""
    rows = []
    for figure in FIGURES:
        predicted = predict(figure, fitted_efficiency(figure.gpu))
        rows.append(
            {
                "figure": figure,
                "predicted": predicted,
                "error": predicted / figure.sequences_per_s - 1,
            }
        )
    return rows
