"""The fused ops, declared once with torch.library: the one road from any caller to any kernel.

    torch.ops.zounlearn.perturb_      theta <- alpha theta + sum_k c_k z(seed, stream_k, e)
    torch.ops.zounlearn.zo_update_    theta <- rule(theta + restore z_last, g = sum_k c_k z_k, m, v)
    torch.ops.zounlearn.grad_update_  theta <- rule(theta, g = grad, m, v)
    torch.ops.zounlearn.perturb_into  out <- alpha theta + sum_k c_k z(seed, stream_k, e)   (theta unchanged)
    torch.ops.zounlearn.sample        z(seed, stream, offset + i) as a new tensor

Each schema names its scalars, as bitsandbytes' do. The updates round what they store into a
half-precision tensor to nearest or stochastically (`rounding`, with the words of
`rounding_stream`: docs/rng.md). Kernels are registered per dispatch key
(CPU, CUDA) by zounlearn/ops/backends.py: the C++ ones with no Python in between; the fakes,
which torch.compile traces with, are the validation layer (validation.py). The in-place ops bump
the version counter of what they write, so autograd refuses a tensor that one of them changed
after it was saved for backward.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from . import validation
from .rules import Hyper

NAMESPACE = "zounlearn"
# The update rules' scalars, by name and in Hyper's order (the C++ ops take them in this order too).
_HYPER_ARGS = ", ".join(f"float {name}" for name in Hyper._fields)
SCHEMAS = {
    "perturb_": "(Tensor(a!)[] params, int[] offsets, float[] coefs, int[] streams, int seed, str dist, "
                "float alpha) -> ()",
    "perturb_into": "(Tensor[] params, Tensor(a!)[] out, int[] offsets, float[] coefs, int[] streams, int seed, "
                    "str dist, float alpha) -> ()",
    "zo_update_": "(Tensor(a!)[] params, Tensor(b!)[] m, Tensor(c!)[] v, int[] offsets, float[] coefs, "
                  f"int[] streams, int seed, str dist, float restore, str rule, str rounding, int rounding_stream, "
                  f"{_HYPER_ARGS}) -> ()",
    "grad_update_": "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] m, Tensor(c!)[] v, Tensor(d!)? scales, "
                    f"int[] offsets, int seed, str rule, str rounding, int rounding_stream, {_HYPER_ARGS}) -> ()",
    "sample": "(SymInt[] size, int seed, int stream, int offset, str dist, ScalarType dtype, Device device) "
              "-> Tensor",
}
KERNEL_OPS = ("perturb_", "perturb_into", "zo_update_", "grad_update_")  # the ops each backend implements

_library = torch.library.Library(NAMESPACE, "FRAGMENT")
for _name, _schema in SCHEMAS.items():
    _library.define(_name + _schema)


def _sample(size, seed, stream, offset, dist, dtype, device):
    out = torch.zeros(size, dtype=dtype, device=device)
    # 0 * 0 + 1 * z is exactly z: sampling is one pass of the perturbation kernel.
    torch.ops.zounlearn.perturb_.default([out], [offset], [1.0], [stream], seed, dist, 0.0)
    return out


# Composite: it runs on every device and backend through perturb_, and traces as perturb_.
_library.impl("sample", _sample, "CompositeImplicitAutograd")

torch.library.register_fake("zounlearn::perturb_", validation.check_perturb, lib=_library)
torch.library.register_fake("zounlearn::perturb_into", validation.check_perturb_into, lib=_library)
torch.library.register_fake("zounlearn::zo_update_", validation.check_zo_update, lib=_library)
torch.library.register_fake("zounlearn::grad_update_", validation.check_grad_update, lib=_library)

# The overloads themselves: a call skips the packet's overload resolution (a few microseconds).
ops = SimpleNamespace(**{name: getattr(torch.ops.zounlearn, name).default for name in SCHEMAS})
