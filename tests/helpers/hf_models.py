"""Tiny Hugging Face models for the tests that serve or cache a causal LM (importing transformers lazily:
the test modules ``pytest.importorskip`` it first)."""

from __future__ import annotations

import torch


def tiny_llama(vocab_size: int, max_position_embeddings: int = 64, seed: int = 0):
    """A randomly initialised 2-layer, 32-wide ``LlamaForCausalLM`` (grouped-query attention: 4 heads, 2 KV heads),
    the same weights for the same ``seed``."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=max_position_embeddings)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)
