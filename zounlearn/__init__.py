"""zounlearn: memory-efficient, robust LLM unlearning with zeroth-order, sign and hybrid optimizers.

Importing never fails for want of a compiled extension: `zounlearn info` lists the
backends that can run here and why the others cannot.
"""

from . import ops, optim, rng
from .ops import perturb_, sample

__version__ = "0.1.0"
__all__ = ["ops", "optim", "perturb_", "rng", "sample", "__version__"]
