"""Fresh random inputs for the kernel tests (torch only: the CUDA check's environment has no transformers)."""

from __future__ import annotations

import torch


def fresh_seed() -> int:
    """Fresh inputs every run; failures print the seed to replay them."""
    return int(torch.randint(2**31, ()).item())
