"""Tokenizers, corpora, packing, the global-cursor sampler and the loader."""
