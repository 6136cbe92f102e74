"""Updates inside backward (FirstOrderOptimizer.update_in_backward): bit-identical to the normal
path where the math is the same, one gradient alive at a time, gradient accumulation through
accumulate(), per-tensor update clipping, and every other backward refused before any write."""

from __future__ import annotations

import gc
import math
import warnings

import loop_twins
import pytest
import torch
from optim_db import OPTIMIZERS, build
from test_optim import loss_fn, make_params, run, targets

from zounlearn import optim
from zounlearn.errors import UsageError
from zounlearn.optim.first_order import FirstOrderOptimizer

FIRST_ORDER = [name for name, info in OPTIMIZERS.items() if issubclass(info.cls, FirstOrderOptimizer)]
CLIPPABLE = ["AdamW", "SGD", "CompressedAdam"]


def _states(opt) -> list[tuple[str, object]]:
    inner = [opt.fo, opt.zo] if isinstance(opt, optim.HybridFOZO) else [opt]
    return [(k, v) for o in inner for g in o.param_groups for p in g["params"] for k, v in sorted(o.state[p].items())]


def assert_identical(a_params, b_params, a_opt, b_opt) -> None:
    for i, (a, b) in enumerate(zip(a_params, b_params)):
        assert torch.equal(a, b), f"param {i}"
    sa, sb = _states(a_opt), _states(b_opt)
    assert [k for k, _ in sa] == [k for k, _ in sb]
    for (key, x), (_, y) in zip(sa, sb):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, key


class GradCounter:
    """The most parameters holding a gradient at once, sampled at every accumulation."""

    def __init__(self, params) -> None:
        self.params, self.most = params, 0
        for p in params:  # registered first: each fires before the optimizer's hook on the same tensor
            p.register_post_accumulate_grad_hook(self._fired)

    def _fired(self, _p) -> None:
        self.most = max(self.most, sum(q.grad is not None for q in self.params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", FIRST_ORDER)
def test_in_backward_is_bit_identical_and_holds_one_gradient(name, dtype):
    info = OPTIMIZERS[name]
    target = targets()
    normal_params, fused_params = make_params(dtype), make_params(dtype)
    normal = build(info, normal_params)
    counter = GradCounter(fused_params)
    fused = build(info, fused_params).update_in_backward()
    assert fused.updates_in_backward
    for _ in range(7):
        assert run(normal, normal_params, target, 1, info.hessian) == run(fused, fused_params, target, 1, info.hessian)
        assert all(p.grad is None for p in fused_params), "the gradients must be freed"
    assert_identical(normal_params, fused_params, normal, fused)
    assert counter.most == 1, "each gradient must be freed before the next one is accumulated"


def test_hybrid_first_order_phase_in_backward_is_bit_identical():
    info = OPTIMIZERS["HybridFOZO"]
    target = targets()
    normal_params, fused_params = make_params(torch.float32), make_params(torch.float32)
    normal = build(info, normal_params, seed=3)
    counter = GradCounter(fused_params)
    fused = build(info, fused_params, seed=3, fo_optimizer=lambda g: optim.SignAdam(g).update_in_backward())
    assert run(normal, normal_params, target, 7) == run(fused, fused_params, target, 7)
    assert_identical(normal_params, fused_params, normal, fused)
    assert counter.most == 1


@pytest.mark.parametrize("with_closure", [True, False], ids=["last-in-step", "all-in-accumulate"])
@pytest.mark.parametrize("name", ["AdamW", "SignAdam", "SophiaG"])
def test_accumulated_micro_batches_update_once_with_their_sum(name, with_closure):
    """Two micro-batches: the normal path's backward, backward, step() is what accumulate() then
    step(closure) (or step()) computes inside backward: one update, from the summed gradient."""
    info = OPTIMIZERS[name]
    halves = [[t * 0.5 for t in targets()], targets(seed=4)]
    normal_params, fused_params = make_params(torch.float32), make_params(torch.float32)
    normal, fused = build(info, normal_params), build(info, fused_params).update_in_backward()
    for _ in range(3):
        normal.zero_grad()
        for half in halves:
            loss_fn(normal_params, half).backward()
        normal.step()
        with fused.accumulate():
            loss_fn(fused_params, halves[0]).backward()
            if not with_closure:
                loss_fn(fused_params, halves[1]).backward()
        assert all(p.grad is not None for p in fused_params), "accumulate() keeps the gradients"
        fused.step(lambda: loss_fn(fused_params, halves[1])) if with_closure else fused.step()
        assert all(p.grad is None for p in fused_params)
    assert_identical(normal_params, fused_params, normal, fused)
    assert [fused.state[p]["step"] for p in fused_params] == [3] * 4, "one update per accumulated step"


def test_a_backward_outside_step_is_refused_before_any_write():
    params = make_params(torch.float32)
    opt = optim.AdamW(params, lr=1e-2).update_in_backward()
    opt.step(lambda: loss_fn(params, targets()))
    before = [p.detach().clone() for p in params]
    state = [(k, v.clone()) for k, v in _states(opt) if isinstance(v, torch.Tensor)]
    with pytest.raises(RuntimeError, match="updates its parameters inside backward.*accumulate.*Nothing was updated"):
        loss_fn(params, targets()).backward()  # e.g. to clip the global gradient norm, or a micro-batch
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(torch.equal(v, w) for (_, v), (_, w) in zip(state, [(k, v) for k, v in _states(opt)
                                                                    if isinstance(v, torch.Tensor)]))
    assert [opt.state[p]["step"] for p in params] == [1] * 4


def test_hooks_go_with_the_optimizer_or_on_request():
    params = make_params(torch.float32)
    opt = optim.SignSGD(params, lr=1e-2).update_in_backward()
    opt.update_in_backward(False)
    assert not opt.updates_in_backward
    loss_fn(params, targets()).backward()  # an ordinary backward again
    assert all(p.grad is not None for p in params)
    for p in params:
        p.grad = None
    optim.SignSGD(params, lr=1e-2).update_in_backward()  # dropped at once
    gc.collect()
    loss_fn(params, targets()).backward()
    assert all(p.grad is not None for p in params)


def test_a_param_group_added_later_updates_in_backward_too():
    params = make_params(torch.float32)
    opt = optim.SignAdam(params[:2], lr=1e-2).update_in_backward()
    opt.add_param_group({"params": params[2:], "lr": 2e-2})
    opt.step(lambda: loss_fn(params, targets()))
    assert all(p.grad is None for p in params)
    assert [opt.state[p]["step"] for p in params] == [1] * 4


def test_non_finite_loss_skips_inside_backward_too():
    params = make_params(torch.float32)
    opt = optim.AdamW(params, lr=1e-2).update_in_backward()
    before = [p.detach().clone() for p in params]
    with opt.accumulate():
        loss_fn(params, targets()).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(lambda: loss_fn(params, targets()) * math.inf)
    assert any("non-finite" in str(w.message) for w in caught)
    assert all(torch.equal(a, b) for a, b in zip(params, before)) and not opt.state
    assert all(p.grad is None for p in params), "the skipped step's accumulated gradients are dropped"


def _clip_twin(params, lr, clip, steps, target):
    """AdamW by loop_twins' formulas with each tensor's lr scaled by min(1, clip / RMS(u))."""
    twin = loop_twins.AdamW(params, lr=lr)
    for _ in range(steps):
        twin.zero_grad()
        loss_fn(params, target).backward()
        with torch.no_grad():
            for p in params:
                state = twin.state[p]
                t = state.get("t", 0) + 1
                m = state.get("exp_avg", torch.zeros_like(p)) * 0.9 + 0.1 * p.grad
                v = state.get("exp_avg_sq", torch.zeros_like(p)) * 0.999 + 0.001 * p.grad**2
                u = (m / (1 - 0.9**t)) / (v.sqrt() / math.sqrt(1 - 0.999**t) + 1e-8)
                scale = min(1.0, clip / u.square().mean().sqrt().item())
                # The clip scales the step of u, not the decoupled decay: (1 - lr wd) stays.
                wd = twin.param_groups[0]["weight_decay"]
                group = {**twin.param_groups[0], "lr": lr * scale, "weight_decay": wd / scale}
                state["t"] = t
                p.copy_(loop_twins.adamw_update(group, state, p.float(), p.grad.float(), t))
    return params


def test_update_clip_scales_each_tensors_step_as_adalomo():
    target = targets()
    twin_params, fused_params, normal_params = (make_params(torch.float32) for _ in range(3))
    clip = 0.5  # Adam's first steps have RMS(u) ~ 1: every tensor is clipped
    fused = optim.AdamW(fused_params, lr=1e-2).update_in_backward()
    normal = optim.AdamW(normal_params, lr=1e-2)
    for opt in (fused, normal):
        for group in opt.param_groups:
            group["update_clip"] = clip
    run(fused, fused_params, target, 5)
    run(normal, normal_params, target, 5)
    assert_identical(normal_params, fused_params, normal, fused)
    _clip_twin(twin_params, 1e-2, clip, 5, target)
    unclipped = make_params(torch.float32)
    run(optim.AdamW(unclipped, lr=1e-2), unclipped, target, 5)
    for a, b, c in zip(fused_params, twin_params, unclipped):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(a, c), "the clip must have changed the step"


@pytest.mark.parametrize("name", CLIPPABLE)
def test_update_clip_is_a_no_op_when_it_does_not_bind(name):
    info = OPTIMIZERS[name]
    target = targets()
    plain, clipped = make_params(torch.float32), make_params(torch.float32)
    a, b = build(info, plain), build(info, clipped).update_in_backward()
    for group in b.param_groups:
        group["update_clip"] = 1e6
    run(a, plain, target, 4)
    run(b, clipped, target, 4)
    assert_identical(plain, clipped, a, b)


@pytest.mark.parametrize("name", ["SignSGD", "SignAdam", "SophiaG"])
def test_update_clip_on_a_bounded_rule_is_refused(name):
    params = make_params(torch.float32)
    opt = OPTIMIZERS[name].cls(params)
    opt.param_groups[0]["update_clip"] = 1.0
    with pytest.raises(UsageError, match="takes no update_clip"):
        opt.update_in_backward()
    before = [p.detach().clone() for p in params]
    with pytest.raises(UsageError, match="takes no update_clip"):
        opt.step(lambda: loss_fn(params, targets()))
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_bad_update_clip_is_named():
    params = make_params(torch.float32)
    opt = optim.AdamW([{"params": params, "update_clip": -1.0}]).update_in_backward(False)
    with pytest.raises(UsageError, match="invalid update_clip"):
        opt.update_in_backward()


def test_data_parallel_is_refused(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    opt = optim.SignAdam(make_params(torch.float32))
    with pytest.raises(UsageError, match="under data parallel are not supported"):
        opt.update_in_backward()
    assert not opt.updates_in_backward
