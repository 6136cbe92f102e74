"""The registry of the fused update rules and their scalars: a leaf module that every layer reads.

One entry per rule says what the rule needs: which float32 state tensors it reads (m, v) and
writes, whether zo_update_ may use it (compressed Adam's two passes need the gradient), and how
it uses the per-tensor `scales`. From it derive the validation (zounlearn/ops/validation.py),
the reference (zounlearn/ops/reference.py), the Triton kernel (kernels/update.py), the
optimizers and the tests. The C++ side is the ZO_UPDATE_RULES table in csrc/update_rules.h,
in the same order; tests/test_update_ops.py checks that the compiled table says the same.

A new rule: its element math (csrc/update_rules.h, kernels/update.py), its entry here and
reference formula (ops/reference.py), its optimizer and its test.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class RuleInfo:
    reads_m: bool
    reads_v: bool
    writes_m: bool
    writes_v: bool
    zeroth_order: bool  # zo_update_ may use it
    scales: str | None = None  # "write": max |u| per tensor into scales; "read": the quantizer's scale
    reads_grad: bool = True  # grad_update_ reads the gradient


class Rule(str, enum.Enum):
    """The update rules, by the name the ops' schemas take (csrc/update_rules.h)."""

    SGD = "sgd"  # momentum SGD, coupled weight decay (torch.optim.SGD, dampening 0)
    SIGN = "sign"  # sign descent, decoupled weight decay
    ADAM = "adam"  # Adam with decoupled weight decay (torch.optim.AdamW)
    ADAZO = "adazo"  # R-AdaZO: v tracks m^2, no bias correction
    SIGN_ADAM = "sign_adam"  # Signum: sign of the first moment
    ADAM_MOMENTS = "adam_moments"  # compressed Adam, pass 1: moments and max |u| per tensor
    QUANTIZED = "quantized"  # compressed Adam, pass 2: theta -= lr Q(u; levels) with that max
    SOPHIA = "sophia"  # SophiaG: clipped m / (rho h + eps), h kept in v (read only)
    DESCENT = "descent"  # theta = decay theta - lr g: ZO-SGD without momentum (coupled decay folded in decay)

    @property
    def info(self) -> RuleInfo:
        return RULES[self]

    @property
    def index(self) -> int:
        """The rule's position in the table (the Triton kernel's constexpr)."""
        return list(RULES).index(self)

    @property
    def uses_m(self) -> bool:
        return RULES[self].reads_m or RULES[self].writes_m

    @property
    def uses_v(self) -> bool:
        return RULES[self].reads_v or RULES[self].writes_v


RULES: dict[Rule, RuleInfo] = {
    Rule.SGD: RuleInfo(reads_m=True, reads_v=False, writes_m=True, writes_v=False, zeroth_order=True),
    Rule.SIGN: RuleInfo(reads_m=False, reads_v=False, writes_m=False, writes_v=False, zeroth_order=True),
    Rule.ADAM: RuleInfo(reads_m=True, reads_v=True, writes_m=True, writes_v=True, zeroth_order=True),
    Rule.ADAZO: RuleInfo(reads_m=True, reads_v=True, writes_m=True, writes_v=True, zeroth_order=True),
    # zeroth-order too: a hybrid whose two phases share Signum's m (docs/optimizers.md).
    Rule.SIGN_ADAM: RuleInfo(reads_m=True, reads_v=False, writes_m=True, writes_v=False, zeroth_order=True),
    Rule.ADAM_MOMENTS: RuleInfo(reads_m=True, reads_v=True, writes_m=True, writes_v=True, zeroth_order=False,
                                scales="write"),
    Rule.QUANTIZED: RuleInfo(reads_m=True, reads_v=True, writes_m=False, writes_v=False, zeroth_order=False,
                             scales="read", reads_grad=False),
    Rule.SOPHIA: RuleInfo(reads_m=True, reads_v=True, writes_m=True, writes_v=False, zeroth_order=False),
    Rule.DESCENT: RuleInfo(reads_m=False, reads_v=False, writes_m=False, writes_v=False, zeroth_order=True),
}
ZO_RULES = tuple(r for r, info in RULES.items() if info.zeroth_order)


def float32(x: float) -> float:
    """x rounded to float32, as the kernels see their scalar arguments."""
    return torch.tensor(x, dtype=torch.float32).item()


class Hyper(NamedTuple):
    """The rules' scalars, named as in the ops' schemas, each rounded to float32 once here so that
    every backend sees the same bits. Pass them as keywords: `op(..., **hyper._asdict())`."""

    lr: float
    decay: float  # 1 - lr * weight_decay (decoupled rules); 1 for SGD
    weight_decay: float  # coupled weight decay (SGD only)
    beta1: float  # also SGD's momentum
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    bias_correction1: float  # 1 - beta1^t
    sqrt_bias_correction2: float  # sqrt(1 - beta2^t)
    levels: float  # QUANTIZED: 2^(bits-1) - 1; 0 means sign
    rho: float  # SOPHIA

    @classmethod
    def make(
        cls,
        lr: float,
        *,
        weight_decay: float = 0.0,
        decoupled: bool = True,
        beta1: float = 0.0,
        beta2: float = 0.0,
        eps: float = 1e-8,
        step: int = 1,
        bits: int = 1,
        rho: float = 0.0,
    ) -> Hyper:
        """step counts from 1 (bias corrections); bits is compressed Adam's N."""
        values = (
            lr,
            1.0 - lr * weight_decay if decoupled else 1.0,
            0.0 if decoupled else weight_decay,
            beta1,
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            eps,
            1.0 - beta1**step,
            math.sqrt(1.0 - beta2**step),
            float(2 ** (bits - 1) - 1),
            rho,
        )
        return cls(*(float32(x) for x in values))


__all__ = ["Hyper", "RULES", "Rule", "RuleInfo", "ZO_RULES", "float32"]
