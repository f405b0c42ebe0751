"""Data pipeline: tokenizers, chat templates with label masks, datasets, packing, distributed loading.

    tok = load_tokenizer("debug-qwen2" | "debug-glm4" | model_dir | tokenizer file)
    ds = build_dataset(["longwriter.jsonl", "sharegpt.jsonl#6660"], tok, max_length=28672, seed=42)
    train, val = split_dataset(ds, 0.01, seed=42)
    loader = StepLoader(train, max_length=28672, batch_size=1, gradient_accumulation_steps=4,
                        rank=rank, world_size=world, seed=42)
    for epoch ...: loader.set_epoch(epoch); for micro_batches in loader: ...

    pairs = build_dataset(["pairs.jsonl"], tok, max_length=32768, row_format=PAIR_FORMAT)  # DPO (preference.py)

Files: tokenizer.py (backends), template.py (jinja chat templates, masks), chat.py (row formats), dataset.py
(jsonl, validation, mixing, lazy length cache; a sample is one or more documents), preference.py (DPO pair
rows, masks cut to the final reply), packing.py (row plans, collation), loader.py (StepLoader).
"""

from engine.data.chat import encode_generation_prompt
from engine.data.dataset import SFT_FORMAT, RowFormat, SFTDataset, build_dataset, split_dataset
from engine.data.loader import StepLoader
from engine.data.packing import collate_rows, pack_lengths, packing_efficiency
from engine.data.preference import PAIR_FORMAT
from engine.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "PAIR_FORMAT",
    "SFT_FORMAT",
    "RowFormat",
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
