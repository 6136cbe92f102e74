"""Unlearning with transformers' Trainer and zounlearn's optimizers: open-unlearning's way (the
loss in a Trainer subclass's compute_loss), plus one base class.

    python examples/trainer_unlearn.py                  # the embedded model and its synthetic people
    python examples/trainer_unlearn.py --model DIR --forget forget.jsonl --retain retain.jsonl

Everything else is the Trainer's own: its scheduler, logging, checkpoints (save_steps,
resume_from_checkpoint), gradient accumulation (exact for zeroth-order steps) and callbacks.
"""

from __future__ import annotations

import argparse

import transformers

from zounlearn.hf import LoopBatches, TrainerMixin, one_batch
from zounlearn.unlearning import Split, UnlearningData, embedded_model, evaluate, load_examples, load_model


class GradDiff(transformers.Trainer):
    """Gradient difference as open-unlearning writes it: -CE(forget) + CE(retain)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget = model(**inputs["forget"])
        loss = -forget.loss + model(**inputs["retain"]).loss
        return (loss, forget) if return_outputs else loss


class GradDiffZO(TrainerMixin, GradDiff):
    """The same Trainer with every zounlearn optimizer: the only line to add."""


def load(args: argparse.Namespace):
    if args.model is None:
        return embedded_model()
    model, tokenizer = load_model(args.model)
    splits = [Split.from_examples(role, [e for path in paths for e in load_examples(path)])
              for role, paths in (("forget", args.forget), ("retain", args.retain))]
    return model, tokenizer, UnlearningData(*splits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a causal LM saved with save_pretrained (default: the embedded model)")
    parser.add_argument("--forget", nargs="+", default=[], help="JSONL files to unlearn (with --model)")
    parser.add_argument("--retain", nargs="+", default=[], help="JSONL files to keep (with --model)")
    parser.add_argument("--optimizer", default="hybrid", help="a zounlearn optimizer name (default: hybrid)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--output", default="runs/trainer-example")
    args = parser.parse_args()

    model, tokenizer, data = load(args)
    before = evaluate(model, tokenizer, data)
    training = transformers.TrainingArguments(
        args.output, max_steps=args.steps, learning_rate=1e-3, lr_scheduler_type="constant",
        gradient_accumulation_steps=2,   # two micro-batches per step, for zeroth-order steps too
        max_grad_norm=0.0,               # zeroth-order steps have no gradient to clip
        per_device_train_batch_size=1,   # each LoopBatches item is a whole batch
        remove_unused_columns=False, logging_steps=10, save_steps=max(args.steps // 2, 1), report_to=[])
    trainer = GradDiffZO(model, training, train_dataset=LoopBatches(data, tokenizer, 8), data_collator=one_batch,
                         optimizer_name=args.optimizer,
                         optimizer_options={"zo_lr": 1e-4, "block": 10} if args.optimizer == "hybrid" else {})
    trainer.train()
    after = evaluate(model, tokenizer, data)
    for key in ("forget/loss", "retain/loss", "forget/qa_accuracy", "retain/qa_accuracy"):
        if key in before:
            print(f"{key:<22} {before[key]:8.3f} -> {after[key]:8.3f}")


if __name__ == "__main__":
    main()
