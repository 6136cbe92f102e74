"""LoRA unlearning through peft with a zeroth-order optimizer in zounlearn's own loop, then the
seed paper's 4-bit attack (bitsandbytes' load_in_4bit, FP4) on the merged model.

    python examples/lora_unlearn.py                     # the embedded model and its synthetic people
    python examples/lora_unlearn.py --model DIR --forget forget.jsonl --retain retain.jsonl

The run directory's model/ holds the adapters as peft saves them, merged/ the merged model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from zounlearn.hf.lora import apply_lora, merged, parse_lora, save_merged
from zounlearn.robustness import quantization_attack
from zounlearn.unlearning import Split, UnlearningData, embedded_model, load_examples, load_model
from zounlearn.unlearning.loop import LoopConfig, unlearn


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
    parser.add_argument("--lora", default="r=8,alpha=16", help="LoRA settings (default: r=8,alpha=16 on peft's "
                                                                "default modules for the architecture)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--output", default="runs/lora-example")
    args = parser.parse_args()

    model, tokenizer, data = load(args)
    model = apply_lora(model, parse_lora(args.lora))  # only the adapters train; the base weights stay as they are
    model.print_trainable_parameters()
    config = LoopConfig(objective="npo", optimizer="adazo", lr=1e-3, steps=args.steps, retain_batch_size=16,
                        objective_options={"retain_weight": 8.0})
    result = unlearn(model, tokenizer, data, config, args.output)
    save_merged(model, tokenizer, Path(args.output) / "merged")
    attacked = quantization_attack(merged(model), tokenizer, data, schemes=("bnb-fp4",))["bnb-fp4"]
    for key in ("forget/loss", "retain/loss", "forget/qa_accuracy", "retain/qa_accuracy"):
        if key in result.before:
            print(f"{key:<22} {result.before[key]:8.3f} -> {result.after[key]:8.3f}   4-bit: {attacked[key]:8.3f}")


if __name__ == "__main__":
    main()
