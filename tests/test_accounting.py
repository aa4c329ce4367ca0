"""Parameter and FLOP accounting against SODA's published shapes and worked sweep rows."""

from __future__ import annotations

import pytest

from soda.shape import ModelShape, forward_flops_per_token, params, tokens_for_budget, training_flops_per_token

SODA_SIZES = {  # width, layers, heads, kv heads, head dim, ffn -> (non-embedding, total) as SODA's paper lists them
    "135m": ((512, 15, 8, 8, 64, 1792), 57.0e6, 205.1e6),
    "600m": ((1024, 28, 16, 8, 128, 3072), 440.5e6, 736.7e6),
    "1.7b": ((2048, 28, 16, 8, 128, 6144), 1409e6, 2002e6),
    "4b": ((2560, 36, 32, 8, 128, 9728), 3634e6, 4374e6),
}


@pytest.mark.parametrize("name", SODA_SIZES)
def test_soda_release_sizes(name):
    dims, non_emb, total = SODA_SIZES[name]
    shape = ModelShape(*dims)
    assert params(shape, "non-embedding") == pytest.approx(non_emb, rel=2e-3)
    assert params(shape, "total") == pytest.approx(total, rel=2e-3)


def test_worked_sweep_row_d768():
    shape = ModelShape.sweep(768)
    assert (shape.layers, shape.heads, shape.kv_heads, shape.head_dim, shape.ffn) == (8, 6, 6, 128, 3072)
    assert params(shape) == pytest.approx(298e6, rel=2e-3)
    assert forward_flops_per_token(shape) == pytest.approx(474.4e6, rel=1e-3)
    assert tokens_for_budget(shape, 3e18) == pytest.approx(2.11e9, rel=2e-3)


def test_sweep_row_d1408_at_9e19():
    shape = ModelShape.sweep(1408)
    assert shape.layers == 14
    assert params(shape) == pytest.approx(851e6, rel=3e-3)


def test_flop_definitions_differ_as_documented():
    small = ModelShape.sweep(256)  # embedding-heavy: 6ND overstates it by far more than 25%
    assert training_flops_per_token(small, "6ND") > 1.25 * training_flops_per_token(small, "3x-forward")
    assert training_flops_per_token(small, "6ND+attention") > training_flops_per_token(small, "6ND")
    with pytest.raises(ValueError, match="unknown FLOP definition"):
        training_flops_per_token(small, "7ND")
    with pytest.raises(ValueError, match="unknown parameter definition"):
        params(small, "embedding")


@pytest.mark.parametrize("dims", [(64, 2, 4, 2, 16, 160), (128, 3, 1, 1, 128, 512)])
def test_counts_match_transformers_qwen3(dims):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shape = ModelShape(*dims, vocab=1000)
    w, layers, heads, kv, hd, ffn = dims
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=1000, hidden_size=w, num_hidden_layers=layers,
                                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
                                         intermediate_size=ffn, tie_word_embeddings=False))
    assert params(shape) == sum(p.numel() for p in model.parameters())
    emb = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    assert params(shape, "non-embedding") == sum(p.numel() for p in model.parameters()) - emb
