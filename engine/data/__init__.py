"""Data pipeline: tokenizers, chat templates with label masks, datasets, packing, distributed loading."""

from engine.data.chat import encode_generation_prompt
from engine.data.dataset import SFTDataset, build_dataset, split_dataset
from engine.data.loader import StepLoader
from engine.data.packing import collate_rows, pack_lengths, packing_efficiency
from engine.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "SFTDataset",
    "StepLoader",
    "Tokenizer",
    "build_dataset",
    "collate_rows",
    "encode_generation_prompt",
    "load_tokenizer",
    "pack_lengths",
    "packing_efficiency",
    "split_dataset",
]
