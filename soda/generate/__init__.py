"""Prompting a trained model: requests, settings and prompts (`prompts`), codebook-aware decoding with a KV cache
(`decode`), the same for the hierarchical family (`hierarchical`) and the `soda-generate` CLI (`cli`)."""
