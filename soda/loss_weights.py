"""Per-kind loss weights (`--loss-weights`), for either model family: one weight per group of the NLL vector
(`Vocabulary.nll_groups()` order: text, special, codebook 0, ..., codebook K-1). Torch-free, so soda-train's settings
(and the sweep, which imports them) can name the schemes without loading torch."""

from __future__ import annotations

LOSS_WEIGHTS = ("uniform", "moshi", "graded")


def loss_weights(scheme: str, n_codebooks: int = 8) -> list[float]:
    """Per-kind weights in `Vocabulary.nll_groups()` order (text, special, cb0, cb1, ..., cb_{K-1}):
    uniform: all 1; moshi: 100 on text, specials and the semantic codebook, 1 on acoustic codebooks;
    graded: 100 on text/specials/semantic and 100^(1 - k/(K-1)) on acoustic codebook k (K=8: 51.8, 26.8, 13.9,
    7.2, 3.7, 1.9, 1.0), the follow-up's best recipe for this family."""
    if scheme == "uniform":
        return [1.0] * (2 + n_codebooks)
    if scheme == "moshi":
        return [100.0] * 3 + [1.0] * (n_codebooks - 1)
    if scheme == "graded":
        return [100.0] * 3 + [100.0 ** (1 - k / max(1, n_codebooks - 1)) for k in range(1, n_codebooks)]
    raise ValueError(f"unknown loss weights {scheme!r}; choose from {LOSS_WEIGHTS}")
