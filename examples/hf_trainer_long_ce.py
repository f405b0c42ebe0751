"""Use the fused linear + cross-entropy (long-ce) as the loss of a Hugging Face `Trainer`.

    python examples/hf_trainer_long_ce.py --steps 4

`LongCETrainer.compute_loss` runs the base model (`model.model`) for the hidden states and hands them with
`model.lm_head.weight` to `kernels.linear_cross_entropy`, so the [tokens, vocab] logits never exist.  The
loss equals transformers' own causal-LM loss: labels are shifted here (HF labels are unshifted), the
sum is divided by `num_items_in_batch` when the Trainer provides it (gradient accumulation), else by the
local target count ("mean").  Under FSDP, call the loss inside the model's forward instead (see
kernels.linear_cross_entropy's docstring).
"""

from __future__ import annotations

import argparse

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer, TrainingArguments

from kernels import linear_cross_entropy


class LongCETrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        hidden = model.model(**inputs).last_hidden_state  # (B, T, H)
        hidden = hidden[:, :-1].flatten(0, 1)  # (B*(T-1), H): position t predicts token t+1
        targets = labels[:, 1:].flatten()
        loss = linear_cross_entropy(hidden, model.lm_head.weight, targets, reduction="sum")
        denom = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
        loss = loss / torch.as_tensor(denom, device=loss.device)
        return (loss, None) if return_outputs else loss


def tiny_qwen2(vocab_size: int = 128, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config)


class ToyDataset(torch.utils.data.Dataset):
    """Random token rows; the first quarter of every row is prompt (label -100)."""

    def __init__(self, n: int = 16, length: int = 24, vocab_size: int = 128, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab_size, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        labels = ids.clone()
        labels[: len(ids) // 4] = -100
        return {"input_ids": ids, "labels": labels}


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--output_dir", default="/tmp/hf_trainer_long_ce")
    parser.add_argument("--baseline", action="store_true", help="the stock Trainer (transformers' own loss)")
    args = parser.parse_args(argv)
    model = tiny_qwen2()
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer_cls = Trainer if args.baseline else LongCETrainer
    trainer = trainer_cls(model=model, args=training_args, train_dataset=ToyDataset())
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    print("losses:", losses)
    return losses


if __name__ == "__main__":
    main()
