"""The memory model: the peak of an optimizer's steady state, by component (docs/memory.md).

Inputs: an architecture's Profile (profile.py), the batch (sequences per step, all of them: an
objective with a retain term runs forget and retain batches), the sequence length, and the
optimizer's Plan: the state it keeps per parameter, in bytes as stored (counted from the
optimizer itself, so float32, bfloat16 and int8 state count what they hold), whether it has a
first-order phase, whether that phase updates inside backward, and how torch's own optimizers
step.

With N parameters of d bytes, n = batch x length tokens, V the vocabulary, L layers:

    weights      W = N d
    state        S = N x state bytes per parameter   (kept across steps and phases)
    activations  A = n (L a_layer + a_other), a_* the profile's saved bytes per token; with
                 activation checkpointing L n hidden d (the layers' inputs) + n a_other, plus one
                 layer's a_layer recomputed during its backward
    logits       n V (d + 4 if d is not float32: the loss's float32 copy); log-softmax n V 4

    zeroth-order step and inference:  W + S + logits + log-softmax + a layer's working set
    first-order step, the largest of (over W + S):
      forward's end      A + logits
      the head's backward  A + 2 n V 4 (the float32 gradients of the log-softmax and the logits)
      the top layer's backward     L n a_layer + head gradient + a layer's working set
      the bottom layer's backward  n a_layer + gradients so far + a layer's working set
      the optimizer step (normal path)  all gradients + the step's scratch
    an update under int8 state: the float32 m and v of the tensor it updates (the largest one's)
    gradients: the normal path keeps all of them (N d) until the step; inside backward one tensor
    at a time, plus, for tied embeddings, the head's gradient that autograd holds for the
    embedding until the end of backward (V hidden d). A layer's working set is twice the largest
    tensor a layer saves. A hybrid's peak is the larger of its two phases' with both states.

torch.optim's state has the parameters' dtype (zounlearn's its state_dtype). Scratch of
torch's AdamW: on the CPU (one tensor at a time) two copies of the largest tensor; on CUDA
(foreach, its default) a copy of v for every parameter; zounlearn's fused passes allocate nothing
parameter-sized (the sphere's norm: 4 MiB).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UsageError
from .profile import Profile

COMPONENTS = ("weights", "gradients", "state", "activations", "scratch")
SPHERE_SCRATCH = 4 << 20
PROBE = 8192  # elements of the probe parameter: above int8 state's 4096 (smaller tensors keep float32)


@dataclass(frozen=True)
class Plan:
    """What an optimizer keeps and does, as the memory model needs it."""

    name: str
    state_bytes: float  # zounlearn's state per parameter, in bytes as stored; a shared state once
    first_order: bool
    zeroth_order: bool
    in_backward: bool = False
    torch_step: str | None = None  # "adamw" or "sgd": torch.optim's own step (its scratch)
    sphere: bool = False
    param_state: float = 0.0  # torch.optim's state elements per parameter: they have the parameters' dtype
    update_scratch: float = 0.0  # bytes per element of the tensor being updated: int8 state's float32 m and v


@dataclass(frozen=True)
class Estimate:
    plan: Plan
    peak: int
    at: str  # where the peak falls
    components: dict[str, int]  # at the peak, bytes by COMPONENTS

    def fits(self, memory_bytes: float) -> bool:
        return self.peak <= memory_bytes


def plan_of(optimizer: torch.optim.Optimizer, name: str | None = None) -> Plan:
    """The Plan of a built optimizer: its phases from its type, its state counted after stepping it
    (so build it over a throwaway probe parameter)."""
    from ..optim import HybridFOZO, ZeroOrderOptimizer
    from ..optim.first_order import FirstOrderOptimizer

    phases = [optimizer.fo, optimizer.zo] if isinstance(optimizer, HybridFOZO) else [optimizer]
    fo = next((o for o in phases if not isinstance(o, ZeroOrderOptimizer)), None)
    zo = next((o for o in phases if isinstance(o, ZeroOrderOptimizer)), None)
    torch_step = None
    if fo is not None and type(fo).__module__.startswith("torch.optim"):
        torch_step = "adamw" if isinstance(fo, (torch.optim.AdamW, torch.optim.Adam)) else "sgd"
    ours, theirs, scratch = _state_per_parameter(optimizer)
    return Plan(name=name or type(optimizer).__name__, state_bytes=ours, param_state=theirs, update_scratch=scratch,
                first_order=fo is not None, zeroth_order=zo is not None,
                in_backward=isinstance(fo, FirstOrderOptimizer) and fo.updates_in_backward,
                torch_step=torch_step, sphere=zo is not None and zo.dist == "sphere")


def plan(name: str, **options: Any) -> Plan:
    """The Plan of the registry's optimizer `name` with `options` (as make_optimizer takes them)."""
    from ..optim import HybridFOZO
    from ..optim.registry import OPTIMIZERS, make_optimizer

    if name.lower() in OPTIMIZERS and OPTIMIZERS[name.lower()].cls is HybridFOZO:
        options.setdefault("block", 1)  # both phases within two probe steps
    return plan_of(make_optimizer(name, [torch.nn.Parameter(torch.zeros(PROBE))], **options), name)


def _state_per_parameter(optimizer: torch.optim.Optimizer) -> tuple[float, float, float]:
    """Step each phase once on the optimizer's (probe) parameters; what it then keeps per parameter:
    (zounlearn's state bytes, torch.optim's state elements, the update's scratch bytes per element:
    4 for each int8-quantized moment, which an update dequantizes into float32)."""
    from ..optim import FusedOptimizer, HybridFOZO, step

    params = [p for g in optimizer.param_groups for p in g["params"]]
    numel = sum(p.numel() for p in params)
    if numel > 1 << 16:
        raise UsageError("plan_of steps the optimizer to count its state: build it over a small probe parameter")
    closure = lambda: sum((p.float() ** 2).sum() for p in params)  # noqa: E731
    inner = [optimizer.fo, optimizer.zo] if isinstance(optimizer, HybridFOZO) else [optimizer]
    for _ in inner:  # the hybrid with block=1: a first-order step, then a zeroth-order one
        step(optimizer, closure)
    for o in inner:
        if hasattr(o, "update_hessian"):  # SophiaG's h exists after its first refresh
            o.update_hessian(closure)

    def tensors(fused: bool):
        return [t for o in inner if isinstance(o, FusedOptimizer) == fused
                for st in o.state.values() for t in st.values() if isinstance(t, torch.Tensor) and t.numel() > 1]

    ours = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors(True)}
    theirs = {t.untyped_storage().data_ptr(): t.numel() for t in tensors(False)}
    # int8 moments per parameter, in the phase with the most: its update dequantizes each into float32
    quantized = max(sum(t.dtype == torch.uint8 for st in o.state.values() for t in st.values()
                        if isinstance(t, torch.Tensor)) / len(params) for o in inner)
    return sum(ours.values()) / numel, sum(theirs.values()) / numel, 4.0 * quantized


def estimate(profile: Profile, optimizer: Plan | str, *, batch: int, length: int, checkpointing: bool = False,
             device: str = "cuda") -> Estimate:
    """The steady-state peak of `optimizer` (a Plan, or a registry name) on the profiled model, in bytes
    the model and the optimizer hold (the runtime itself, a CUDA context say, excluded)."""
    p = plan(optimizer) if isinstance(optimizer, str) else optimizer
    if batch < 1 or length < 1:
        raise UsageError(f"batch and length must be at least 1, got {batch} and {length}")
    d, n = profile.element_size, batch * length
    W = profile.params * d
    S = round(profile.params * (p.state_bytes + p.param_state * d))
    update = round(p.update_scratch * profile.largest_params)
    logits = n * profile.vocab * (d + (4 if d != 4 else 0))
    log_softmax = n * profile.vocab * 4
    working = round(2 * n * profile.layer_largest)
    scratch_zo = SPHERE_SCRATCH if p.sphere else 0
    candidates: list[tuple[str, dict[str, int]]] = []
    if p.zeroth_order or not p.first_order:
        what = "zeroth-order step" if p.zeroth_order else "inference"
        candidates.append((what, {"weights": W, "state": S, "activations": 0,
                                  "scratch": logits + log_softmax + working + scratch_zo, "gradients": 0}))
        if p.zeroth_order and update:
            candidates.append(("zeroth-order update", {"weights": W, "state": S, "scratch": update}))
    if p.first_order:
        candidates += _first_order(profile, p, W, S, n, logits, log_softmax, working, update, checkpointing, device)
    at, parts = max(candidates, key=lambda c: sum(c[1].values()))
    parts = {k: int(parts.get(k, 0)) for k in COMPONENTS}
    return Estimate(plan=p, peak=sum(parts.values()), at=at, components=parts)


def _first_order(profile: Profile, p: Plan, W: int, S: int, n: int, logits: int, log_softmax: int, working: int,
                 update: int, checkpointing: bool, device: str) -> list[tuple[str, dict[str, int]]]:
    d, L = profile.element_size, profile.layers
    layer = round(n * profile.layer_saved)
    other = round(n * profile.other_saved)
    head_grad = profile.vocab * profile.hidden * d  # the output head's gradient
    if checkpointing:
        kept_layers, recomputed = L * n * profile.hidden * d, layer
        top, bottom = kept_layers + recomputed, n * profile.hidden * d + recomputed
    else:
        kept_layers = L * layer
        top, bottom = kept_layers, layer
    A = kept_layers + other
    if p.in_backward:
        # One tensor at a time; a tied head's gradient waits for the embedding's, at the end of backward.
        tied = head_grad if profile.tied else 0
        g_top = tied + (0 if profile.tied else profile.largest_params * d)
        g_bottom = tied + profile.layer_largest_params * d
    else:
        g_top, g_bottom = head_grad, profile.params * d
    base = {"weights": W, "state": S}
    during = working + (update if p.in_backward else 0)  # an update inside backward works on one tensor's scratch
    out = [("forward's end", {**base, "activations": A, "scratch": logits}),
           ("backward, head", {**base, "activations": A, "scratch": 2 * log_softmax}),
           ("backward, top layer", {**base, "activations": top, "gradients": g_top, "scratch": during}),
           ("backward, bottom layer", {**base, "activations": bottom, "gradients": g_bottom, "scratch": during})]
    if not p.in_backward:
        out.append(("optimizer step", {**base, "gradients": profile.params * d,
                                       "scratch": _step_scratch(profile, p, device) + update}))
    return out


def _step_scratch(profile: Profile, p: Plan, device: str) -> int:
    if p.torch_step != "adamw":
        return 0
    d = profile.element_size  # torch's state has the parameters' dtype
    if device == "cuda":  # foreach: sqrt(v) for every parameter at once
        return profile.params * d
    return 2 * profile.largest_params * d


__all__ = ["COMPONENTS", "Estimate", "Plan", "estimate", "plan", "plan_of"]
