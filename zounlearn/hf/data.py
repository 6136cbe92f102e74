"""Our loop's batches as a Trainer's training data.

`LoopBatches(data, tokenizer, ...)` yields, for i = 0, 1, ..., the forget batch and the retain
batch that our loop (zounlearn.unlearning.loop) takes at its step i: the same seeded `Batches`
(forget seed, retain seed + 1, their own epochs), as open-unlearning lays a step out,
{"forget": {"input_ids", "attention_mask", "labels"}, "retain": {...}}. Each item is a whole
batch: give the Trainer per_device_train_batch_size=1, data_collator=`one_batch`,
remove_unused_columns=False and max_steps (the iterable does not end). With
gradient_accumulation_steps=k, optimizer step s takes items sk to sk + k - 1 as its micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..unlearning.batches import Batch, Batches
from ..unlearning.data import UnlearningData
from ..unlearning.loop import trainable


def as_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """A Batch as a Hugging Face causal LM's keyword inputs (labels -100 off the answer)."""
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}


class LoopBatches(torch.utils.data.IterableDataset):
    """See the module docstring; retain_batch_size None: batch_size, with_retain False: forget only."""

    def __init__(self, data: UnlearningData, tokenizer: PreTrainedTokenizerBase, batch_size: int = 8, *,
                 retain_batch_size: int | None = None, seed: int = 0, max_length: int | None = None,
                 with_retain: bool = True) -> None:
        super().__init__()
        self.forget = Batches(trainable(data.forget), tokenizer, batch_size, seed=seed, max_length=max_length)
        self.retain = Batches(trainable(data.retain), tokenizer, retain_batch_size or batch_size, seed=seed + 1,
                              max_length=max_length) if with_retain else None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        step = 0
        while True:
            item = {"forget": as_inputs(self.forget.batch(step))}
            if self.retain is not None:
                item["retain"] = as_inputs(self.retain.batch(step))
            yield item
            step += 1


def one_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The data collator for LoopBatches: each item is already a batch."""
    if len(items) != 1:
        raise ValueError(f"LoopBatches items are whole batches: use per_device_train_batch_size=1 (got {len(items)} "
                         f"items per batch)")
    return items[0]


__all__ = ["LoopBatches", "as_inputs", "one_batch"]
