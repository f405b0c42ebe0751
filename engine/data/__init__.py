"""Data pipeline: tokenizers, chat templates with label masks, datasets, packing, distributed loading."""

from engine.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]
