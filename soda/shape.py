"""Model shapes: the size presets (`SIZES`), and parameter and FLOP counts for Qwen3-style decoders, with the
definitions as explicit settings.

SODA's scaling axis is C = 3 x analytic forward FLOPs (attention over the full sequence and the
LM head included) and N = total parameters (both embedding matrices). 6*N*D overstates small,
embedding-heavy models by 25% or more, so it is offered only as a named alternative. The same
functions serve `soda-train --dry-run`, MFU logging and the sweep planner (`scaling`).

Torch-free on purpose (numpy only): `scaling` and `--dry-run` import it without loading torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# name -> (width, layers, heads, kv_heads, head_dim, ffn). SODA's released shapes are Qwen3's;
# "1b" is ours: a Qwen3-family shape between 600m and 1.7b (1536 wide, 28 layers, GQA 16/8).
SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (64, 2, 2, 1, 32, 192),
    "135m": (512, 15, 8, 8, 64, 1792),
    "600m": (1024, 28, 16, 8, 128, 3072),
    "1b": (1536, 28, 16, 8, 128, 4608),
    "1.7b": (2048, 28, 16, 8, 128, 6144),
    "4b": (2560, 36, 32, 8, 128, 9728),
}
SHAPE_FIELDS = ("width", "layers", "heads", "kv_heads", "head_dim", "ffn")
SODA_VOCAB = 144_644
PARAM_DEFINITIONS = ("total", "non-embedding")
FLOP_DEFINITIONS = ("3x-forward", "6ND", "6ND+attention")


@dataclass(frozen=True)
class ModelShape:
    """The numbers that fix a Qwen3-style decoder's size (RMSNorm, SwiGLU, QK-norm, no biases)."""

    width: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int = SODA_VOCAB
    seq_len: int = 4096
    tied: bool = False

    @classmethod
    def sweep(cls, width: int, vocab: int = SODA_VOCAB, seq_len: int = 4096) -> "ModelShape":
        """SODA's IsoFLOP rule: layers = round(d / (64 + 4*log2 d - 7)), heads = kv = max(1, d/128), FFN 4d."""
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        layers = max(1, round(width / (64 + 4 * math.log2(width) - 7)))
        heads = max(1, width // 128)
        return cls(width, layers, heads, heads, 128, 4 * width, vocab, seq_len)

    @classmethod
    def sweep_continuous(cls, width, vocab: int = SODA_VOCAB, seq_len: int = 4096) -> "ModelShape":
        """The same rule with width real and layers, heads left unrounded (numpy arrays welcome): a smooth
        curve through the family for `soda-scaling fit` to minimise along, not a model one can build."""
        width = np.asarray(width, float)
        layers = np.maximum(1.0, width / (64 + 4 * np.log2(width) - 7))
        heads = np.maximum(1.0, width / 128)
        return cls(width, layers, heads, heads, 128, 4 * width, vocab, seq_len)


def embedding_params(shape: ModelShape) -> int:
    return shape.vocab * shape.width * (1 if shape.tied else 2)


def layer_params(shape: ModelShape) -> int:
    d, hd = shape.width, shape.head_dim
    attention = d * shape.heads * hd + 2 * d * shape.kv_heads * hd + shape.heads * hd * d
    mlp = 3 * d * shape.ffn
    norms = 2 * d + 2 * hd  # two RMSNorms per block, plus Qwen3's q/k norms
    return attention + mlp + norms


def params(shape: ModelShape, definition: str = "total") -> int:
    """'total' counts both embedding matrices (SODA's N); 'non-embedding' leaves them out."""
    if definition not in PARAM_DEFINITIONS:
        raise ValueError(f"unknown parameter definition {definition!r}; choose from {PARAM_DEFINITIONS}")
    body = shape.layers * layer_params(shape) + shape.width  # + final norm
    return body + embedding_params(shape) if definition == "total" else body


def attention_flops_per_token(shape: ModelShape) -> int:
    """Scores and weighted sum over the full (not causally halved) sequence, plus softmax."""
    s, h, hd = shape.seq_len, shape.heads, shape.head_dim
    return shape.layers * (4 * s * h * hd + 3 * s * h)


def forward_flops_per_token(shape: ModelShape) -> int:
    """Per layer 6*d*ffn + 2*d*(h*hd + 2*kv*hd) + 2*(h*hd)*d + attention; plus the LM head 2*d*V."""
    d, hd = shape.width, shape.head_dim
    matmuls = 6 * d * shape.ffn + 2 * d * (shape.heads * hd + 2 * shape.kv_heads * hd) + 2 * shape.heads * hd * d
    return shape.layers * matmuls + attention_flops_per_token(shape) + 2 * d * shape.vocab


def training_flops_per_token(shape: ModelShape, definition: str = "3x-forward") -> float:
    if definition == "3x-forward":
        return 3.0 * forward_flops_per_token(shape)
    if definition == "6ND":
        return 6.0 * params(shape, "total")
    if definition == "6ND+attention":
        return 6.0 * params(shape, "total") + 3.0 * attention_flops_per_token(shape)
    raise ValueError(f"unknown FLOP definition {definition!r}; choose from {FLOP_DEFINITIONS}")


def training_flops(shape: ModelShape, tokens: float, definition: str = "3x-forward") -> float:
    return training_flops_per_token(shape, definition) * tokens


def tokens_for_budget(shape: ModelShape, budget: float, definition: str = "3x-forward") -> float:
    return budget / training_flops_per_token(shape, definition)
