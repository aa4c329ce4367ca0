"""Prompting a trained model: requests, settings and prompts (`prompts`), codebook-aware decoding with a KV cache
(`decode`) and the `soda-generate` CLI (`cli`)."""
