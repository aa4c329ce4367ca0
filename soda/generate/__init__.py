"""Prompting a trained model: codebook-aware decoding with a KV cache (`decode`) and the `soda-generate` CLI."""
