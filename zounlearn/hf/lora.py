"""LoRA adapters through peft, for every zounlearn optimizer and our loop.

    spec = parse_lora("r=8,alpha=16,target=c_attn,c_proj")   # the --lora option's text
    model = apply_lora(model, spec)          # a peft PeftModel: only the adapters require grad
    unlearn(model, tokenizer, data, config, "runs/lora")    # saves the adapters as peft does
    save_merged(model, tokenizer, "runs/lora/merged")       # the merged model, on request

The optimizers update what requires grad, so ZO, sign, Sophia and hybrid steps touch only the
adapters and the base weights stay bit-identical. peft's save_pretrained writes
adapter_config.json and adapter_model.safetensors; `merged` is a copy with the adapters folded
into the weights (peft's merge_and_unload), the model class and parameter names of the original:
what the attacks and diagnostics take (zounlearn.robustness), as a LoRA-unlearned model would be
deployed. LoRA dropout is 0 by default: a zeroth-order difference needs both passes on one network.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..atomic import atomic_dir
from ..checks import check_int, check_range
from ..errors import UsageError

KEYS = ("r", "alpha", "dropout", "target")


@dataclass(frozen=True)
class LoraSpec:
    """r: the adapters' rank; alpha: their scale (alpha / r multiplies the update); target: the module
    names to adapt (None: peft's default for the architecture, e.g. GPT-2's c_attn, Llama's q_proj and
    v_proj); dropout on the adapters' input."""

    r: int = 8
    alpha: float = 16.0
    target: tuple[str, ...] | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_int("LoRA r", self.r, 1)
        check_range("LoRA alpha", self.alpha, 0.0, open_low=True)
        check_range("LoRA dropout", self.dropout, 0.0, 1.0)


def parse_lora(text: str) -> LoraSpec:
    """`r=8,alpha=16,target=q_proj,v_proj,dropout=0.05`: comma-separated KEY=VALUE; names after
    target= that have no '=' are more target modules. Omitted keys keep LoraSpec's defaults."""
    values: dict[str, str | list[str]] = {}
    last = None
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            if last != "target":
                raise UsageError(f"--lora: {item!r} is not KEY=VALUE; use e.g. r=8,alpha=16,target=c_attn")
            values["target"].append(item)
            continue
        key = key.strip()
        if key not in KEYS:
            raise UsageError(f"--lora has no key {key!r}; its keys: {', '.join(KEYS)}")
        if key in values:
            raise UsageError(f"--lora gives {key} twice")
        values[key] = [value.strip()] if key == "target" else value.strip()
        last = key
    try:
        return LoraSpec(r=int(values.get("r", 8)), alpha=float(values.get("alpha", 16.0)),
                        target=tuple(values["target"]) if "target" in values else None,
                        dropout=float(values.get("dropout", 0.0)))
    except ValueError as err:
        raise UsageError(f"--lora {text!r}: {err}") from None


def apply_lora(model: PreTrainedModel, spec: LoraSpec) -> torch.nn.Module:
    """The model with LoRA adapters (a peft PeftModel, which wraps the model given: its weights are the
    base weights, frozen); a target that names no module fails with peft's message."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, task_type="CAUSAL_LM",
                        target_modules=list(spec.target) if spec.target else None)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise UsageError(f"--lora: {err}") from None


def merged(model: torch.nn.Module) -> PreTrainedModel:
    """A copy of a LoRA model with its adapters merged into the weights (the model itself unchanged);
    a model without adapters is returned as it is."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    return copy.deepcopy(model).merge_and_unload()


def save_merged(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike) -> None:
    """The merged model and the tokenizer, saved with save_pretrained (safetensors), atomically."""
    with atomic_dir(directory) as work:
        merged(model).save_pretrained(work)
        tokenizer.save_pretrained(work)


__all__ = ["LoraSpec", "apply_lora", "merged", "parse_lora", "save_merged"]
