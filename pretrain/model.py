"""BERT encoder with the MLM (and optional NSP/SOP) heads.

Shape legend: B batch, S sequence, H hidden, F MLP width, V vocabulary, N scored positions,
h heads (of this rank), d head width = H / heads.

Two LayerNorm arrangements, chosen by `ModelShape.norm`:
- post: original BERT (LayerNorm after each residual add, and after the embeddings);
- pre:  Megatron's rearrangement (LayerNorm before attention and before the MLP, none after
        the embeddings, a final LayerNorm), what keeps xlarge and 3.9B stable.
The two match `transformers`' BertForPreTraining and MegatronBertForPreTraining, so export is a
key-mapping table (see export_hf.py).

The model knows nothing of process groups. Tensor parallelism replaces its Linear/Embedding
modules from outside; the only concession is `view(B, S, -1, 3, d)` below, which works whatever
number of heads a rank holds. The fused QKV weight is laid out per head ([h, 3, d] rows), so a
contiguous split of its rows gives each rank whole heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import kernels
from pretrain.config import ModelShape

LAYER_NORM_EPS = 1e-12


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same `weight`/`bias`, same state dict) computed by `kernels.layer_norm`:
    a fused Triton kernel where kernels.dispatch selects one, F.layer_norm elsewhere.

    With `residual`, normalises x + residual with the add fused into the same kernel;
    `with_sum` also returns that sum (pre-LN carries it on as the residual stream).
    """

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.layer_norm(x, self.weight, self.bias, self.eps, residual=residual)

    def with_sum(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(LayerNorm(x + residual), x + residual)."""
        return kernels.layer_norm(
            x, self.weight, self.bias, self.eps, residual=residual, return_sum=True
        )


class BiasSkippingLinear(nn.Linear):
    """nn.Linear (same `weight`/`bias`, same state dict) whose forward returns (x A, bias) with
    the bias unapplied (Megatron's skip_bias_add), so the next op can fuse the bias add.
    Tensor parallelism replaces it by a ColumnParallelLinear that keeps this flag."""

    skip_bias_add = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return F.linear(x, self.weight), self.bias


class Embeddings(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.word = nn.Embedding(shape.vocab_size, shape.hidden)
        self.position = nn.Embedding(shape.max_seq_len, shape.hidden)
        self.token_type = nn.Embedding(2, shape.hidden)
        # Pre-LN models normalise at the start of each layer instead (MegatronBertEmbeddings).
        self.norm = LayerNorm(shape.hidden, LAYER_NORM_EPS) if shape.norm == "post" else None
        self.dropout = nn.Dropout(shape.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        positions = torch.arange(seq_len, device=input_ids.device)
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)  # [B, S, H]


class AttentionCore(nn.Module):
    """softmax(QK^T / sqrt(d)) V with dropout, through scaled_dot_product_attention.

    A module of its own so that recomputation and tensor parallelism's RNG handling (dropout
    here acts on this rank's heads only) can be applied to exactly this region from outside.
    """

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.dropout_p = dropout
        self.recompute = False  # set by apply_recompute("selective")

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        dropout_p = self.dropout_p if self.training else 0.0
        if self.recompute and torch.is_grad_enabled():
            # The [B, h, S, S]-sized intermediates are recomputed in backward instead of stored.
            return checkpoint(
                F.scaled_dot_product_attention,
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                use_reentrant=False,
            )
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


class SelfAttention(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.head_dim = shape.hidden // shape.heads
        self.qkv = nn.Linear(shape.hidden, 3 * shape.hidden)  # rows: [heads, 3, d]
        self.core = AttentionCore(shape.dropout)
        self.out = nn.Linear(shape.hidden, shape.hidden)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        qkv = self.qkv(x).view(batch, seq_len, -1, 3, self.head_dim)  # [B, S, h, 3, d]
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [B, h, S, d]
        context = self.core(q, k, v, attn_mask)
        context = context.transpose(1, 2).reshape(batch, seq_len, -1)  # [B, S, h*d]
        return self.out(context)


class MLP(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.fc_in = BiasSkippingLinear(shape.hidden, shape.ffn_hidden)
        self.fc_out = nn.Linear(shape.ffn_hidden, shape.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fc_in (whole or its tensor-parallel column shard) leaves its bias to the fused
        # bias + GELU: [B, S, F_tp] and [F_tp].
        hidden, bias = self.fc_in(x)
        return self.fc_out(kernels.bias_gelu(hidden, bias))


class TransformerLayer(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.pre_norm = shape.norm == "pre"
        self.attention = SelfAttention(shape)
        self.attention_norm = LayerNorm(shape.hidden, LAYER_NORM_EPS)
        self.mlp = MLP(shape)
        self.mlp_norm = LayerNorm(shape.hidden, LAYER_NORM_EPS)
        self.dropout = nn.Dropout(shape.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        # Every residual add that feeds a LayerNorm is fused into it (kernels.layer_norm).
        if self.pre_norm:
            attended = self.dropout(self.attention(self.attention_norm(x), attn_mask))
            normed, x = self.mlp_norm.with_sum(attended, residual=x)
            return x + self.dropout(self.mlp(normed))
        x = self.attention_norm(self.dropout(self.attention(x, attn_mask)), residual=x)
        return self.mlp_norm(self.dropout(self.mlp(x)), residual=x)


class MLMHead(nn.Module):
    """Transform (dense, GELU, LayerNorm); the decoder is the tied word embedding + `bias`."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.dense = nn.Linear(shape.hidden, shape.hidden)
        self.norm = LayerNorm(shape.hidden, LAYER_NORM_EPS)
        self.bias = nn.Parameter(torch.zeros(shape.vocab_size))
        # -inf on vocabulary padding (tensor parallelism pads the vocabulary; see parallelize).
        # A buffer so that it moves with the model; not saved: parallelize rebuilds it.
        self.vocab_mask: torch.Tensor | None
        self.register_buffer("vocab_mask", None, persistent=False)

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(hidden)))

    def logit_bias(self) -> torch.Tensor:
        return self.bias if self.vocab_mask is None else self.bias + self.vocab_mask


class Bert(nn.Module):
    """BERT for pre-training: `forward` gives hidden states; objectives.py applies the heads.

    The MLM loss lives outside `forward` so that sparse MLM can gather the masked positions
    before the head, and dense MLM can score every position without materialising all logits.
    """

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.shape = shape
        self.embeddings = Embeddings(shape)
        self.layers = nn.ModuleList(TransformerLayer(shape) for _ in range(shape.layers))
        self.final_norm = LayerNorm(shape.hidden, LAYER_NORM_EPS) if shape.norm == "pre" else None
        self.pooler = nn.Linear(shape.hidden, shape.hidden)
        self.mlm_head = MLMHead(shape)
        self.pair_head = nn.Linear(shape.hidden, 2) if shape.pair_head else None
        if self.pair_head is None:
            # Exported for fine-tuning, but unused (so untrained) without a pair task; freezing
            # it keeps it out of the optimizer and out of DDP's gradient buckets.
            self.pooler.requires_grad_(False)
        self.recompute_layers = False  # set by apply_recompute("full")
        self.apply(_init_weights)

    @property
    def decoder_weight(self) -> torch.Tensor:
        return self.embeddings.word.weight  # [V, H], tied

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, token_type_ids [B, S]; attention_mask [B, S] (1 = token, 0 = padding)."""
        attn_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):  # CPU-GPU sync point
            attn_mask = attention_mask[:, None, None, :].bool()  # [B, 1, 1, S]
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            if self.recompute_layers and torch.is_grad_enabled():
                x = checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x  # [B, S, H]

    def pair_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """NSP/SOP logits [B, 2] from the pooled [CLS] state."""
        if self.pair_head is None:
            raise RuntimeError("this model was built without a sentence-pair head")
        return self.pair_head(torch.tanh(self.pooler(hidden[:, 0])))


def _init_weights(module: nn.Module) -> None:
    """BERT's initialisation: N(0, 0.02) for weights, zeros for biases, ones for LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def apply_recompute(model: Bert, mode: str) -> None:
    """Activation recomputation: trade compute for activation memory (pretrain/memory.py says
    how much; the cluster files name the layouts that need it).

    full: keep only each layer's input and recompute the layer in backward; selective: recompute
    just the attention core, whose activations grow with S^2. RNG state is replayed, so dropout
    masks and gradients equal those without recomputation.
    """
    model.recompute_layers = mode == "full"
    for layer in model.layers:
        layer.attention.core.recompute = mode == "selective"


def build_model(shape: ModelShape, device: torch.device | str = "cpu") -> Bert:
    with torch.device(device):
        return Bert(shape)


def count_parameters(model: nn.Module, *, non_embedding: bool = False) -> int:
    """Parameters counted once (tied weights once); `non_embedding` drops embedding tables."""
    total = 0
    for name, param in model.named_parameters():
        if non_embedding and name.startswith("embeddings."):
            continue
        total += param.numel()
    return total


def flops_per_step(shape: ModelShape, seq_len: int, sequences: int, scored: float) -> float:
    """Model FLOPs of forward + backward over `sequences` sequences of `seq_len` positions.

    Counted as 2 FLOPs per multiply-add of every matrix product, x 3 for forward + backward:
    the encoder's linear layers (4 H^2 + 2 H F per position and layer), attention's scores and
    weighted sum at the sequence length (4 S H per position and layer: QK^T and AV), the MLM
    head (transform H^2 and decoder H V) on the `scored` positions only (all non-special
    positions for dense MLM, the picked ones for sparse), and the pooler + pair classifier on
    one position per sequence when there is a pair task. Padding positions count: the encoder
    computes them. Recomputation's extra forward is not a model FLOP and is not counted.
    """
    h, f, layers = shape.hidden, shape.ffn_hidden, shape.layers
    positions = sequences * seq_len
    encoder = 2 * layers * (4 * h * h + 2 * h * f) * positions
    attention = 2 * layers * 2 * seq_len * h * positions
    head = 2 * (h * h + h * shape.vocab_size) * scored
    pair = 2 * (h * h + 2 * h) * sequences if shape.pair_head else 0
    return 3.0 * (encoder + attention + head + pair)


def flops_per_token(shape: ModelShape, seq_len: int, scored_fraction: float) -> float:
    """`flops_per_step` per position, when the MLM head scores `scored_fraction` of them."""
    return flops_per_step(shape, seq_len, 1, scored_fraction * seq_len) / seq_len


def param_count_formula(shape: ModelShape) -> int:
    """Closed-form parameter count, used to check the docs/design.md sizes on the meta device."""
    h, f, v = shape.hidden, shape.ffn_hidden, shape.vocab_size
    embeddings = (v + shape.max_seq_len + 2) * h + (2 * h if shape.norm == "post" else 0)
    layer = (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
    final = 2 * h if shape.norm == "pre" else 0
    heads = (h * h + h) + (h * h + h + 2 * h + v) + ((2 * h + 2) if shape.pair_head else 0)
    return embeddings + shape.layers * layer + final + heads
