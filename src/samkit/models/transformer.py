"""A small character-level Transformer language model (GPT-style, after nanoGPT)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samkit.models.common import MAX_DEPTH, MAX_WIDTH, check_dropout, check_positive_int


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask.

    By default written out (``softmax(QKᵀ/√d + mask) V``), which is twice differentiable, as
    Hessian-vector products need; ``fused=True`` uses ``scaled_dot_product_attention``
    (faster, but its CPU and flash kernels have no double backward).
    """

    def __init__(
        self, n_embd: int, n_head: int, dropout: float, bias: bool, fused: bool = False
    ) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.fused = fused
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        if self.fused:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            y = self.attn_dropout(att) @ v
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))`` (GELU, 4× width)."""

    def __init__(
        self, n_embd: int, n_head: int, dropout: float, bias: bool, fused: bool = False
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias, fused)
        self.ln2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd, bias=bias),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd, bias=bias),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Token and learned position embeddings, ``n_layer`` pre-LN blocks, a final LayerNorm and
    a linear head tied to the token embedding. Input ``B×T`` int64 tokens (T ≤ ``seq_len``),
    output ``B×T×V`` logits; train with cross-entropy on ``logits.flatten(0, 1)``.

    Args:
        input_shape: ``(seq_len,)``, the longest context.
        num_classes: the vocabulary size V.
        n_layer, n_head, n_embd: depth, heads, width (``n_embd`` divisible by ``n_head``).
        dropout: on embeddings, attention and residual branches.
        bias: biases in the linear and LayerNorm layers.
        tie_weights: share the token embedding with the output head.
        fused_attention: use ``scaled_dot_product_attention`` (faster on a GPU); the default
            written-out attention is the one that supports Hessian-vector products.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = True,
        tie_weights: bool = True,
        fused_attention: bool = False,
    ) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise ValueError(
                f"Model 'transformer' needs input_shape (seq_len,), got {input_shape}"
            )
        self.seq_len = check_positive_int("seq_len", input_shape[0])
        check_positive_int("n_layer", n_layer, maximum=MAX_DEPTH)
        check_positive_int("n_head", n_head, maximum=MAX_WIDTH)
        check_positive_int("n_embd", n_embd, maximum=MAX_WIDTH)
        if n_embd % n_head:
            raise ValueError(f"Invalid n_embd: {n_embd} (must be divisible by n_head={n_head})")
        dropout = check_dropout(dropout)
        self.tok = nn.Embedding(num_classes, n_embd)
        self.pos = nn.Embedding(self.seq_len, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(n_embd, n_head, dropout, bias, fused_attention) for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, num_classes, bias=False)
        if tie_weights:
            self.head.weight = self.tok.weight
        # GPT-2 initialization: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer).
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual = name.endswith(("proj.weight", "mlp.2.weight"))
                std = 0.02 / math.sqrt(2 * n_layer) if residual else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: Tensor) -> Tensor:
        if idx.dim() != 2:
            raise ValueError(f"expected B×T token indices, got shape {tuple(idx.shape)}")
        t = idx.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence length {t} exceeds the model's seq_len {self.seq_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
