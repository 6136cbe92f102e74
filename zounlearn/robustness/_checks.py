"""Argument checks that the attacks and diagnostics share, made before any model is copied or run."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from ..errors import UsageError
from ..unlearning.evaluation import evaluate

# The keyword arguments of `evaluate` besides the model, the tokenizer and the data.
EVAL_KWARGS = tuple(name for name, p in inspect.signature(evaluate).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY)


def check_eval_kwargs(eval_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """eval_kwargs as a dict, or a ValueError naming the unknown key."""
    eval_kwargs = dict(eval_kwargs or {})
    unknown = sorted(set(eval_kwargs) - set(EVAL_KWARGS))
    if unknown:
        raise UsageError(f"unknown evaluation argument {unknown[0]!r}; evaluate takes {', '.join(EVAL_KWARGS)}")
    return eval_kwargs

