"""zounlearn with Hugging Face's libraries, without forks of them.

trainer.py: every zounlearn optimizer inside transformers' Trainer (`Trainer`, `TrainerMixin`),
zeroth-order gradient accumulation exact; stepping.py: the optimizer as the Trainer holds it;
data.py: our loop's batches as a Trainer's data.
"""

from .data import LoopBatches, as_inputs, one_batch
from .stepping import StepAdapter, takes_zeroth_order_step
from .trainer import Trainer, TrainerMixin

__all__ = ["LoopBatches", "StepAdapter", "Trainer", "TrainerMixin", "as_inputs", "one_batch", "takes_zeroth_order_step"]
