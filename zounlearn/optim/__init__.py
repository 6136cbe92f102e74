"""Drop-in torch.optim optimizers on the fused ops, by grade (docs/optimizers.md).

zeroth-order: ZOSGD (MeZO), ZOSignSGD, ZOAdam, AdaZO, ZOSignAdam; compressed first-order: SignSGD,
SignAdam, CompressedAdam; second-order: SophiaG; the hybrid: HybridFOZO; and torch.optim's AdamW
and SGD as fused passes. The closure computes and returns the loss only: ZO optimizers call it
under no_grad, first-order ones call backward() themselves; `step(optimizer, closure)` takes
one step of any torch optimizer on such a closure.
"""

from .base import FusedOptimizer, step
from .classic import SGD, AdamW
from .hybrid import HybridFOZO
from .sign import CompressedAdam, SignAdam, SignSGD
from .sophia import SophiaG, gnb_loss
from .zo import ZOSGD, AdaZO, ZeroOrderOptimizer, ZOAdam, ZOSignAdam, ZOSignSGD

__all__ = ["SGD", "AdaZO", "AdamW", "CompressedAdam", "FusedOptimizer", "HybridFOZO", "SignAdam", "SignSGD",
           "SophiaG", "ZOAdam", "ZOSGD", "ZOSignAdam", "ZOSignSGD", "ZeroOrderOptimizer", "gnb_loss", "step"]
