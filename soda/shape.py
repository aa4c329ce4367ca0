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


# --------------------------------------------------------------------------------------------
# The hierarchical family (soda.hierarchical): a backbone over steps plus a depth transformer per frame
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HierarchicalShape:
    """The sizes of a hierarchical model: a Qwen3 backbone over steps (a step is one text/special token or one
    whole audio frame) and a small Qwen3 "depth" decoder run over each frame's codebooks.

    `backbone.vocab` is the flat vocabulary (its rows embed text, specials and every codebook's codes; a frame's
    input is the sum of its codebooks' rows) and `backbone.seq_len` counts steps. The unified head predicts text,
    specials and codebook 0 (`unified_vocab` = audio base + codebook size: 130,308 with SODA's vocabulary). The
    depth decoder runs `n_codebooks` positions per frame and has one `codebook_size`-way head per acoustic codebook.

    Depth size rule (the follow-up's knee, dd384/L4 at d768): half the backbone width, 4 layers, the backbone's
    head dim (heads = width / head dim, at least 1, as many kv heads), FFN 4x its width."""

    backbone: ModelShape
    n_codebooks: int = 8
    codebook_size: int = 2048
    depth_width: int | None = None  # None: backbone width // 2
    depth_layers: int = 4
    depth_heads: int | None = None  # None: max(1, depth width // backbone head dim)
    depth_ffn: int | None = None  # None: 4 x depth width

    def __post_init__(self):
        if self.depth_width is None:
            object.__setattr__(self, "depth_width", max(1, self.backbone.width // 2))
        if self.depth_heads is None:
            object.__setattr__(self, "depth_heads", max(1, self.depth_width // self.backbone.head_dim))
        if self.depth_ffn is None:
            object.__setattr__(self, "depth_ffn", 4 * self.depth_width)
        if self.audio_base < 0:
            raise ValueError(f"a vocabulary of {self.backbone.vocab} ids cannot hold {self.n_codebooks} codebooks "
                             f"of {self.codebook_size}")

    @property
    def audio_base(self) -> int:
        """The first audio id of the flat vocabulary (text ids and specials come before it)."""
        return self.backbone.vocab - self.n_codebooks * self.codebook_size

    @property
    def unified_vocab(self) -> int:
        """Outputs of the backbone's head: the flat ids below audio base, then codebook 0's codes."""
        return self.audio_base + self.codebook_size

    @property
    def depth(self) -> ModelShape:
        """The depth decoder as a ModelShape: its "vocabulary" is the acoustic codes of codebooks 0..K-2 (its input
        table) and as many head rows (K-1 heads of codebook_size), untied; its sequence is one frame's K positions."""
        return ModelShape(self.depth_width, self.depth_layers, self.depth_heads, self.depth_heads,
                          self.backbone.head_dim, self.depth_ffn, (self.n_codebooks - 1) * self.codebook_size,
                          self.n_codebooks)


def hierarchical_params(shape: HierarchicalShape, definition: str = "total") -> int:
    """Exactly `sum(p.numel())` of the built `soda.hierarchical.HierarchicalModel` ('total'), or without the input
    tables and output heads ('non-embedding'): backbone (flat-vocabulary embedding, layers, final norm, unified
    head) + projection of the backbone state into the depth width + depth (codebook 0..K-2 table, layers, final
    norm, K-1 heads)."""
    if definition not in PARAM_DEFINITIONS:
        raise ValueError(f"unknown parameter definition {definition!r}; choose from {PARAM_DEFINITIONS}")
    b, d = shape.backbone, shape.depth
    body = b.layers * layer_params(b) + b.width + d.layers * layer_params(d) + d.width
    projection = b.width * d.width
    if definition == "non-embedding":
        return body + projection
    tables = b.vocab * b.width + shape.unified_vocab * b.width + 2 * d.vocab * d.width
    return body + projection + tables


def backbone_forward_flops_per_step(shape: HierarchicalShape) -> int:
    """One backbone step: the flat model's per-token count (attention over `seq_len` steps) with the unified head."""
    b = shape.backbone
    return forward_flops_per_token(ModelShape(b.width, b.layers, b.heads, b.kv_heads, b.head_dim, b.ffn,
                                              shape.unified_vocab, b.seq_len))


def depth_forward_flops_per_frame(shape: HierarchicalShape) -> int:
    """One frame's depth pass: the projection 2*d*dd, K positions of the depth decoder (attention over the K
    positions, full), and K-1 heads of 2*dd*codebook_size (position 0's output is not scored)."""
    d = shape.depth
    body = forward_flops_per_token(ModelShape(d.width, d.layers, d.heads, d.kv_heads, d.head_dim, d.ffn, 0,
                                              d.seq_len))
    heads = (shape.n_codebooks - 1) * 2 * d.width * shape.codebook_size
    return 2 * shape.backbone.width * d.width + shape.n_codebooks * body + heads


def hierarchical_forward_flops_per_step(shape: HierarchicalShape, frames_per_step: float = 1.0) -> float:
    """Forward FLOPs per backbone step: the backbone, plus the depth pass for the share of steps that are frames.
    The default 1.0 charges the depth pass at every step, as the follow-up's accountant did (an upper bound: text
    and special steps run no depth pass)."""
    return backbone_forward_flops_per_step(shape) + frames_per_step * depth_forward_flops_per_frame(shape)


def hierarchical_training_flops_per_step(shape: HierarchicalShape, definition: str = "3x-forward",
                                         frames_per_step: float = 1.0) -> float:
    """Training FLOPs per step under the flat family's definitions: 3 x forward, 6N per step, or 6N plus 3 x the
    backbone's attention (the depth's attention over K positions is negligible and left out there)."""
    if definition == "3x-forward":
        return 3.0 * hierarchical_forward_flops_per_step(shape, frames_per_step)
    if definition == "6ND":
        return 6.0 * hierarchical_params(shape, "total")
    if definition == "6ND+attention":
        return 6.0 * hierarchical_params(shape, "total") + 3.0 * attention_flops_per_token(shape.backbone)
    raise ValueError(f"unknown FLOP definition {definition!r}; choose from {FLOP_DEFINITIONS}")


def hierarchical_forward_flops_per_audio_second(shape: HierarchicalShape, frame_rate: float = 12.5) -> float:
    """Forward FLOPs per second of audio: `frame_rate` frames (Mimi: 12.5/s), each one backbone step and one depth
    pass (the flat model spends `frame_rate * n_codebooks` tokens on the same second)."""
    return frame_rate * (backbone_forward_flops_per_step(shape) + depth_forward_flops_per_frame(shape))
