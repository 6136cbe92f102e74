"""The optimizers against their pure-PyTorch loop twins (tests/loop_twins.py) and against
torch.optim itself, the ZO estimator against autograd, convergence, schedulers, the state dict
round trip, and the step's contract (skips, errors, frozen parameters, pass count, memory).
The generic tests are drawn from the optimizer table in tests/optim_db.py."""

from __future__ import annotations

import copy
import math
import warnings

import loop_twins
import pytest
import torch
from conftest import DEVICE, FAST_BACKENDS
from optim_db import OPTIMIZERS, build

from zounlearn import optim, sample
from zounlearn.errors import UsageError
from zounlearn.optim.base import loss_value
from zounlearn.optim.mezo import mezo_step

SHAPES = [(7, 13), (129,), (5, 3, 7), (300,)]  # four tensors: two param groups of two
WITH_TWIN = [name for name, info in OPTIMIZERS.items() if info.twin is not None]


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((0.5 * torch.randn(s, generator=gen)).to(dtype).to(DEVICE)) for s in SHAPES]


def targets(seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(DEVICE) for s in SHAPES]


def loss_fn(params, target) -> torch.Tensor:
    """Smooth, not quadratic, in float64 so that its own rounding does not blur g_j."""
    total = 0.0
    for p, t in zip(params, target):
        x = p.double()
        total = total + ((x - t) ** 2).mean() + 0.1 * torch.cos(3 * x).mean()
    return total


def run(opt, params, target, steps: int, hessian: bool = False) -> list[float]:
    losses = []
    for _ in range(steps):
        closure = lambda: loss_fn(params, target)  # noqa: E731
        if hessian:
            # A deterministic stand-in for the sampled-label loss: its gradient's square is the estimate.
            loss = opt.step(closure, hessian_closure=lambda: loss_fn(params, [t * 0.5 for t in target]))
        else:
            loss = opt.step(closure)
        losses.append(loss_value(loss))
    return losses


def inner(opt):
    """The optimizers that keep the state: the hybrid's two inner ones, or opt itself."""
    return [opt.fo, opt.zo] if isinstance(opt, optim.HybridFOZO) else [opt]


def state_tensors(opt) -> list[tuple[str, torch.Tensor]]:
    """The moments (every state tensor but the step counts), parameter by parameter."""
    return [(k, v) for o in inner(opt) for g in o.param_groups for q in g["params"]
            for k, v in sorted(o.state[q].items()) if isinstance(v, torch.Tensor) and k != "step"]


def assert_close_dtype(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """float32: tight. Half types: within 2 units of the dtype, except a bounded 1% of elements
    (a sign update flips at a tie, or one rounding lands the other way, and later steps follow)."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6, msg=what)
        return
    ulp = torch.finfo(dtype).eps * want.float().abs().clamp(min=1e-2)
    off = ((got.float() - want.float()).abs() > 2 * ulp).sum().item()
    assert off <= max(1, want.numel() // 100), f"{what}: {off} of {want.numel()} elements differ"


def _zo_extra(info, dtype=torch.float32):
    return {"seed": 2**40 + 3, "mu": 1e-2 if dtype == torch.float32 else 5e-2} if info.zeroth_order else {}


@pytest.mark.parametrize("backend", FAST_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", WITH_TWIN)
def test_equals_loop_twin(name, dtype, backend):
    info = OPTIMIZERS[name]
    target = targets()
    fused_params, twin_params = make_params(dtype), make_params(dtype)
    fused = build(info, fused_params, **_zo_extra(info, dtype))
    twin = build(info, twin_params, twin=True, **_zo_extra(info, dtype))
    for step in range(7):
        fused_loss = run(fused, fused_params, target, 1, info.hessian)
        twin_loss = run(twin, twin_params, target, 1, info.hessian)
        assert fused_loss == pytest.approx(twin_loss, rel=1e-4), step
        if info.zeroth_order:
            assert fused.last_projected_grads == pytest.approx(twin.last_projected_grads, rel=1e-3, abs=1e-3)
    for i, (a, b) in enumerate(zip(fused_params, twin_params)):
        assert not torch.equal(a, make_params(dtype)[i]), "the optimizer did not move the parameters"
        assert_close_dtype(a.detach(), b.detach(), dtype, f"param {i}")
    twin_states = [twin.fo, twin.zo] if isinstance(twin, loop_twins.HybridFOZO) else [twin]
    twin_state = [(k, v) for o in twin_states for g in o.param_groups for q in g["params"]
                  for k, v in sorted(o.state[q].items()) if isinstance(v, torch.Tensor)]
    fused_state = state_tensors(fused)
    assert [k for k, _ in fused_state] == [k for k, _ in twin_state]
    assert bool(fused_state) == info.keeps_moments
    for (key, a), (_, b) in zip(fused_state, twin_state):
        assert a.dtype == torch.float32
        # State is float32 for every parameter dtype; half parameters feed it rounded values.
        assert_close_dtype(a, b, torch.float32 if dtype == torch.float32 else dtype, key)
    # Every parameter counted its own steps: all 7, or the hybrid's 4 first-order and 3 zeroth-order.
    counts = [4, 3] if isinstance(fused, optim.HybridFOZO) else [7]
    for o, count in zip(inner(fused), counts):
        assert [o.state[p]["step"] for p in fused_params] == [count] * len(fused_params)


def test_mezo_step_by_hand():
    """One ZO-SGD step against the algorithm written out: no code shared but the RNG."""
    gen = torch.Generator().manual_seed(2)
    p = torch.nn.Parameter(torch.randn(50, generator=gen).to(DEVICE))
    theta = p.detach().clone()
    t = torch.randn(50, generator=gen, dtype=torch.float64).to(DEVICE)
    f = lambda x: float(((x.double() - t) ** 2).sum())  # noqa: E731
    opt = optim.ZOSGD([p], lr=0.1, mu=1e-3, seed=5, weight_decay=0.01)
    opt.step(lambda: f(p))
    z = sample(50, 5, 0, device=DEVICE)
    plus = theta + 1e-3 * z  # float32, as the first pass leaves it
    minus = plus + (-2e-3) * z  # the second pass starts from theta + mu z
    g = (f(plus) - f(minus)) / 2e-3
    assert opt.last_projected_grads == pytest.approx([g], rel=1e-12)
    torch.testing.assert_close(p.detach(), theta - 0.1 * (g * z + 0.01 * theta), rtol=1e-5, atol=1e-6)


def _mean_estimate(loss, params, dist: str, steps: int, queries: int = 8) -> torch.Tensor:
    """Mean of g_j z_j over steps * queries directions, read through the public API."""
    opt = optim.ZOSGD(params, lr=0.0, mu=1e-4, dist=dist, queries=queries, seed=11)
    n = sum(p.numel() for p in params)
    total = torch.zeros(n, dtype=torch.float64, device=DEVICE)
    for _ in range(steps):
        first = opt.draws
        opt.step(loss)
        for j, g in enumerate(opt.last_projected_grads):
            z = sample(n, 11, first + j, dist="gaussian" if dist == "sphere" else dist, device=DEVICE).double()
            if dist == "sphere":
                z = z / z.norm() * n  # unit direction, times d: the sphere estimator's scale
            total += g * z
    return total / (steps * queries)


def _mlp():
    gen = torch.Generator().manual_seed(3)
    w1 = torch.nn.Parameter(torch.randn(6, 4, generator=gen).to(DEVICE))
    b1 = torch.nn.Parameter(torch.zeros(6, device=DEVICE))
    w2 = torch.nn.Parameter(torch.randn(1, 6, generator=gen).to(DEVICE))
    x = torch.randn(32, 4, generator=gen).to(DEVICE)
    y = torch.randn(32, 1, generator=gen).to(DEVICE)
    return [w1, b1, w2], lambda: ((torch.tanh(x @ w1.T + b1) @ w2.T - y) ** 2).mean()


def _quadratic():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(30, 30, generator=gen)
    a = (a @ a.T / 30 + torch.eye(30)).to(DEVICE)
    b = torch.randn(30, generator=gen).to(DEVICE)
    x = torch.nn.Parameter(torch.randn(30, generator=gen).to(DEVICE))
    return [x], lambda: 0.5 * x @ a @ x + b @ x


@pytest.mark.parametrize("problem", [_quadratic, _mlp], ids=["quadratic", "mlp"])
@pytest.mark.parametrize("dist", ["rademacher", "gaussian", "sphere"])
def test_estimate_approaches_autograd_gradient(problem, dist):
    params, loss = problem()
    for p in params:
        p.grad = None
    loss().backward()
    true = torch.cat([p.grad.reshape(-1) for p in params]).double()
    estimate = _mean_estimate(loss, params, dist, steps=400)
    cos = torch.nn.functional.cosine_similarity(estimate, true, dim=0).item()
    assert cos >= 0.95, cos
    # And the scale is right, not only the direction.
    assert estimate.norm().item() == pytest.approx(true.norm().item(), rel=0.25)


def test_per_group_mu_estimates_each_groups_gradient():
    """Groups perturbed by different mu: E[(d_j / mu_g) z_j] on group g is still its gradient (the
    other groups' terms scale by mu_h / mu_g and add variance, not bias)."""
    params, loss = _mlp()
    for p in params:
        p.grad = None
    loss().backward()
    true = torch.cat([p.grad.reshape(-1) for p in params]).double()
    opt = optim.ZOSGD([{"params": params[:2], "mu": 1e-4}, {"params": params[2:], "mu": 3e-4}], lr=0.0,
                      queries=8, seed=11)
    n = sum(p.numel() for p in params)
    split = params[0].numel() + params[1].numel()
    total = torch.zeros(n, dtype=torch.float64, device=DEVICE)
    for _ in range(400):
        first = opt.draws
        opt.step(loss)
        for j, g in enumerate(opt.last_projected_grads):  # d_j / mu of the first group
            z = sample(n, 11, first + j, device=DEVICE).double()
            z[split:] *= 1e-4 / 3e-4  # the second group's estimate is d_j / mu_2 = g * mu_1 / mu_2
            total += g * z
    estimate = total / (400 * 8)
    for part in (slice(0, split), slice(split, n)):
        assert torch.nn.functional.cosine_similarity(estimate[part], true[part], dim=0).item() >= 0.9
        assert estimate[part].norm().item() == pytest.approx(true[part].norm().item(), rel=0.3)


@pytest.mark.parametrize("name", [n for n, info in OPTIMIZERS.items() if info.convergence])
def test_lowers_regression_loss(name):
    """Least squares on 20 features: a stated factor within a stated number of steps."""
    info = OPTIMIZERS[name]
    options, steps, factor = info.convergence
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 20, generator=gen).to(DEVICE)
    y = x @ torch.randn(20, generator=gen).to(DEVICE)
    w = torch.nn.Parameter(torch.zeros(20, device=DEVICE))
    loss = lambda: ((x @ w - y) ** 2).mean()  # noqa: E731
    start = loss().item()
    opt = info.cls([w], **options)
    for _ in range(steps):
        opt.step(loss)
    assert loss().item() < factor * start, (loss().item(), start)


def _fresh(name, params):
    info = OPTIMIZERS[name]
    return build(info, params, **({"seed": 9, "mu": 1e-2} if info.zeroth_order else {}))


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["reference"], indirect=True)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_is_bit_identical(name, backend):
    target = targets()
    params = make_params(torch.bfloat16)
    opt = _fresh(name, params)
    hessian = OPTIMIZERS[name].hessian
    run(opt, params, target, 3, hessian)
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    run(opt, params, target, 4, hessian)

    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = _fresh(name, resumed)
    opt2.load_state_dict(saved_state)
    run(opt2, resumed, target, 4, hessian)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    for (k, a), (_, b) in zip(state_tensors(opt), state_tensors(opt2)):
        assert a.dtype == torch.float32 and torch.equal(a, b), k


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_refused_state_dict_changes_nothing(name):
    """load_state_dict checks whose state dict it is and that every tensor fits before it changes
    anything: a refused one leaves the optimizer as it was (and a later step as it would be)."""
    params = make_params(torch.float32)
    opt = _fresh(name, params)
    run(opt, params, targets(), 2, OPTIMIZERS[name].hessian)
    before = copy.deepcopy(opt.state_dict())
    other = "AdaZO" if name != "AdaZO" else "SignAdam"
    foreign_params = make_params(torch.float32)
    foreign = _fresh(other, foreign_params)
    run(foreign, foreign_params, targets(), 1)
    bad = [foreign.state_dict(), torch.optim.Adam(params).state_dict()]
    wrong_shape = copy.deepcopy(before)  # one moment of another model's shape, where there are moments
    states = (wrong_shape["zo"] if "zo" in wrong_shape else wrong_shape)["state"].values()
    moment = next(((state, k) for state in states for k, v in state.items()
                   if isinstance(v, torch.Tensor) and k != "step"), None)
    if moment is not None:
        moment[0][moment[1]] = torch.zeros(3)
        bad.append(wrong_shape)
    for state_dict in bad:
        with pytest.raises(UsageError):
            opt.load_state_dict(state_dict)
        after = opt.state_dict()
        assert after.keys() == before.keys()
        for (k, a), (_, b) in zip(state_tensors(opt), state_tensors(_loaded(name, before))):
            assert torch.equal(a, b), k


def _loaded(name, state_dict):
    opt = _fresh(name, make_params(torch.float32))
    opt.load_state_dict(copy.deepcopy(state_dict))
    return opt


def test_hybrid_schedule_ends_on_zo_and_keeps_inner_state():
    params = make_params(torch.float32)
    target = targets()
    opt = optim.HybridFOZO(params, block=3, zo_block=2, total_steps=12, lr=1e-2, zo_lr=1e-2)
    # Counted from the end: ZO ZO | FO FO FO | ZO ZO | FO FO FO | ZO ZO ... for 12 steps.
    assert "".join(opt.phase(t)[0] for t in range(12)) == "zzfffzzfffzz"
    phases = []
    for _ in range(12):
        opt.step(lambda: loss_fn(params, target))
        phases.append(opt.last_phase[0])
    assert phases == list("zzfffzzfffzz")
    assert opt.zo.draws == 6 and all(opt.zo.state[p]["step"] == 6 for p in params)
    assert all(s["step"].item() == 6 for s in opt.fo.state.values())
    assert all(p.grad is None for p in params), "gradients are freed after each first-order step"
    unbounded = optim.HybridFOZO(make_params(torch.float32))
    assert [unbounded.phase(t) for t in (0, 19, 20, 39, 40)] == ["fo", "fo", "zo", "zo", "fo"]


def test_hybrid_first_order_step_without_closure_uses_the_gradients():
    """step() without a closure (a Trainer that backpropagates itself) equals step(closure) in a
    first-order block; a zeroth-order step without one is refused and changes nothing."""
    target = targets()
    with_closure, without = make_params(torch.float32), make_params(torch.float32)
    a, b = (optim.HybridFOZO(p, lr=1e-2, zo_lr=1e-2, block=2, zo_block=1) for p in (with_closure, without))
    for _ in range(2):
        a.step(lambda: loss_fn(with_closure, target))
        loss_fn(without, target).backward()
        assert b.step() is None and b.last_phase == "fo"
    assert all(torch.equal(x, y) for x, y in zip(with_closure, without))
    assert b.steps == 2 and all(p.grad is None for p in without)
    before = [p.detach().clone() for p in without]
    with pytest.raises(ValueError, match="zeroth-order steps need a closure"):
        b.step()
    assert b.steps == 2 and all(torch.equal(x, y) for x, y in zip(before, without))


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["reference"], indirect=True)
def test_hybrid_round_trip_mid_block(backend):
    target = targets()

    def fresh(params):
        return optim.HybridFOZO(params, lr=1e-2, zo_lr=1e-2, block=3, total_steps=10,
                                fo_optimizer=lambda groups: optim.SignAdam(groups),
                                zo_optimizer=lambda groups: optim.AdaZO(groups, mu=1e-2, seed=4))

    params = make_params(torch.float32)
    opt = fresh(params)
    run(opt, params, target, 5)  # the schedule is z fff zzz fff: saved in the middle of the second ZO block
    saved = (copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params])
    run(opt, params, target, 5)
    resumed = [torch.nn.Parameter(p) for p in saved[1]]
    opt2 = fresh(resumed)
    opt2.load_state_dict(saved[0])
    run(opt2, resumed, target, 5)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed))


@pytest.mark.parametrize("scheduler", ["LambdaLR", "CosineAnnealingLR"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_schedulers_drive_the_learning_rate(name, scheduler):
    """Every torch scheduler works with every optimizer: the scheduled rates are the ones the
    update uses (the same parameters as setting them by hand; others than a constant rate)."""
    info = OPTIMIZERS[name]
    target = targets()
    make = {"LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5**s),
            "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=3)}[scheduler]
    scheduled_params, manual_params, constant_params = (make_params(torch.float32) for _ in range(3))
    scheduled, manual, constant = (_fresh(name, p) for p in (scheduled_params, manual_params, constant_params))
    sched = make(scheduled)
    for _ in range(4):
        for group, copied in zip(scheduled.param_groups, manual.param_groups):
            copied["lr"] = group["lr"]
            if "zo_lr" in group:  # the hybrid's ZO phase follows the schedule's factor
                copied["zo_lr"] = group["zo_lr"] * group["lr"] / group["initial_lr"]
        for opt, params in ((scheduled, scheduled_params), (manual, manual_params), (constant, constant_params)):
            run(opt, params, target, 1, info.hessian)
        sched.step()
    assert all(torch.equal(a, b) for a, b in zip(scheduled_params, manual_params))
    assert not all(torch.equal(a, b) for a, b in zip(scheduled_params, constant_params))


def test_hybrid_inner_optimizers_follow_its_groups():
    params = make_params(torch.float32)
    opt = optim.HybridFOZO([{"params": params[:2]}, {"params": params[2:], "lr": 3e-3, "zo_lr": 2e-3}],
                           lr=1e-2, zo_lr=1e-3, block=1, total_steps=4)
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 3e-3] and opt.param_groups[0]["zo_lr"] == 1e-3
    opt.param_groups[0]["lr"] = 4e-2
    opt.step(lambda: loss_fn(params, targets()))
    assert [g["lr"] for g in opt.fo.param_groups] == [4e-2, 3e-3]
    assert [g["lr"] for g in opt.zo.param_groups] == [1e-3, 2e-3]  # no scheduler: zo_lr as given
    extra = torch.nn.Parameter(torch.zeros(5))
    opt.add_param_group({"params": [extra], "lr": 5e-3})
    assert len(opt.fo.param_groups) == len(opt.zo.param_groups) == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_non_finite_loss_skips_the_step(name, bad):
    target = targets()
    params = make_params(torch.float32)
    opt = _fresh(name, params)
    run(opt, params, target, 2, OPTIMIZERS[name].hessian)
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    calls = []

    def closure():
        calls.append(1)
        loss = loss_fn(params, target)
        return loss * bad if len(calls) == 2 or not OPTIMIZERS[name].zeroth_order else loss

    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        opt.step(closure)
    for a, b in zip(params, before):  # undone within the restore's rounding
        atol = 2 * torch.finfo(torch.float32).eps * (b.abs().max().item() + 1e-2)
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=atol)
    after = opt.state_dict()
    assert after.get("zounlearn") == state.get("zounlearn") and after.get("steps") == state.get("steps")
    for (k, a), (_, b) in zip(state_tensors(opt), state_tensors(_loaded(name, state))):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", ["ZOSGD", "AdaZO"])
def test_closure_errors_restore_the_parameters(name):
    params = make_params(torch.float32)
    before = [p.detach().clone() for p in params]
    opt = _fresh(name, params)
    with pytest.raises(ValueError, match="scalar loss"):
        opt.step(lambda: torch.ones(3))
    calls = []

    def interrupted():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return 1.0

    with pytest.raises(KeyboardInterrupt):
        opt.step(interrupted)
    for a, b in zip(params, before):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-6)
    assert opt.draws == 0 and not any("step" in opt.state[p] for p in params)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_frozen_parameters_are_never_touched(name):
    params = make_params(torch.float32)
    params[1].requires_grad_(False)
    frozen = params[1].detach().clone()
    opt = _fresh(name, params)
    run(opt, params, targets(), 3, OPTIMIZERS[name].hessian)
    assert torch.equal(params[1].detach(), frozen)
    assert not torch.equal(params[0].detach(), make_params(torch.float32)[0])


@pytest.mark.parametrize("name", [n for n, info in OPTIMIZERS.items() if not info.zeroth_order
                                  and info.cls is not optim.HybridFOZO])
def test_parameter_without_gradient_is_skipped(name):
    """As torch.optim: a parameter (or a whole group) without a gradient this step is not updated
    and its state and step count stay as they were."""
    params = make_params(torch.float32)
    opt = _fresh(name, params)
    used = [params[0], params[2]]  # the first group only: the second has no gradient at all
    target = targets()
    closure = lambda: loss_fn(used, [target[0], target[2]])  # noqa: E731
    for _ in range(2):
        opt.step(closure)
    assert torch.equal(params[1].detach(), make_params(torch.float32)[1])
    assert not opt.state[params[1]] and opt.state[params[0]]["step"] == 2


def test_bias_correction_counts_each_parameters_own_steps():
    """A parameter that first gets a gradient at step 6 is bias-corrected from its own first step
    (torch.optim.Adam's per-parameter state["step"]): CompressedAdam at 16 bits is Adam's step
    rounded to 1 / 32767 of the largest, against torch.optim.Adam itself."""
    late = torch.nn.Parameter(torch.full((4,), 0.5))
    early = torch.nn.Parameter(torch.ones(3))
    ours = optim.CompressedAdam([early, late], lr=0.1, bits=16)
    theirs_late = late.detach().clone().requires_grad_()
    theirs = torch.optim.Adam([early.detach().clone().requires_grad_(), theirs_late], lr=0.1)
    for step in range(7):
        for opt, ps in ((ours, [early, late]), (theirs, theirs.param_groups[0]["params"])):
            opt.zero_grad(set_to_none=True)
            loss = (ps[0] ** 2).sum() + ((ps[1] ** 2).sum() if step >= 5 else 0.0)
            loss.backward()
            opt.step()
    assert ours.state[late]["step"] == 2
    torch.testing.assert_close(late.detach(), theirs_late.detach(), rtol=0, atol=1e-4)


def _against_torch(ours, theirs, params, theirs_params, steps, grads_at, add_group_at=None):
    for step in range(steps):
        if step == add_group_at:
            extra = torch.nn.Parameter(torch.linspace(-1, 1, 9))
            ours.add_param_group({"params": [extra], "lr": 0.03, "weight_decay": 0.0})
            theirs.add_param_group({"params": [extra.detach().clone().requires_grad_()], "lr": 0.03,
                                    "weight_decay": 0.0})
            params.append(extra)
            theirs_params.append(theirs.param_groups[-1]["params"][0])
        for opt, ps in ((ours, params), (theirs, theirs_params)):
            opt.zero_grad(set_to_none=True)
            loss = sum(torch.cos(3 * p).sum() + (p**2).sum() for i, p in enumerate(ps) if grads_at(i, step))
            loss.backward()
            opt.step()
    for a, b in zip(params, theirs_params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_adamw_rule_against_torch_adamw():
    """grad_update_'s Adam rule, through AdamW, against torch.optim.AdamW: two groups with their
    own rates and decay, a parameter that joins at step 4, a param group added at step 6."""
    gen = torch.Generator().manual_seed(8)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((7, 5), (33,), (4, 4))]
    theirs_params = [p.detach().clone().requires_grad_() for p in params]

    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02, "betas": (0.8, 0.95), "weight_decay": 0.3}]

    ours = optim.AdamW(groups(params), lr=0.05, weight_decay=0.1, eps=1e-6)
    theirs = torch.optim.AdamW(groups(theirs_params), lr=0.05, weight_decay=0.1, eps=1e-6, foreach=False)
    _against_torch(ours, theirs, params, theirs_params, 10, lambda i, step: i != 1 or step >= 4, add_group_at=6)
    assert [ours.state[p]["step"] for p in params] == [10, 6, 10, 4]


def test_sgd_rule_against_torch_sgd():
    """grad_update_'s momentum-SGD rule, through SGD, against torch.optim.SGD (dampening 0)."""
    gen = torch.Generator().manual_seed(9)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((6, 6), (17,))]
    theirs_params = [p.detach().clone().requires_grad_() for p in params]
    ours = optim.SGD([{"params": params[:1]}, {"params": params[1:], "momentum": 0.5, "lr": 0.02}], lr=0.05,
                     momentum=0.9, weight_decay=0.01)
    theirs = torch.optim.SGD([{"params": theirs_params[:1]}, {"params": theirs_params[1:], "momentum": 0.5,
                                                               "lr": 0.02}], lr=0.05, momentum=0.9,
                             weight_decay=0.01, foreach=False)
    _against_torch(ours, theirs, params, theirs_params, 8, lambda i, step: i == 0 or step % 2 == 0, add_group_at=3)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_hyperparameter_is_a_group_key(name):
    """As torch.optim: defaults hold every per-group hyperparameter, so groups and schedulers can set them."""
    info = OPTIMIZERS[name]
    opt = _fresh(name, make_params(torch.float32))
    assert "lr" in opt.defaults and all(set(opt.defaults) <= set(g) for g in opt.param_groups)
    if info.zeroth_order:
        assert "mu" in opt.defaults
    for key, value in info.groups[1].items():
        assert opt.param_groups[1][key] == value


def test_step_helper_takes_any_torch_optimizer():
    """optim.step runs a loss-only closure with any torch optimizer: backward inside, gradients freed."""
    params, target = make_params(torch.float32), targets()
    theirs = [p.detach().clone().requires_grad_() for p in params]
    sgd = torch.optim.SGD(params, lr=0.1)
    loss = optim.step(sgd, lambda: loss_fn(params, target))
    manual = torch.optim.SGD(theirs, lr=0.1)
    expected = loss_fn(theirs, target)
    expected.backward()
    manual.step()
    assert loss == pytest.approx(expected.item()) and all(p.grad is None for p in params)
    assert all(torch.equal(a, b) for a, b in zip(params, theirs))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        optim.step(sgd, lambda: loss_fn(params, target) * float("nan"))
    assert all(torch.equal(a, b) for a, b in zip(params, theirs))


class _Counter:
    """Counts the elements each op call touches, passing the call on."""

    def __init__(self, ops):
        self.ops, self.elements = ops, 0

    def __getattr__(self, name):
        fn = getattr(self.ops, name)

        def counted(params, *args):
            self.elements += sum(p.numel() for p in params)
            return fn(params, *args)

        return counted


@pytest.mark.parametrize(
    "cls, options, passes",
    [(optim.ZOSGD, {}, 3), (optim.ZOSGD, {"queries": 3}, 7), (optim.ZOSGD, {"estimator": "forward", "queries": 2}, 3),
     (optim.AdaZO, {}, 3), (optim.ZOSGD, {"momentum": 0.9, "queries": 2}, 5)],
)
def test_pass_count(monkeypatch, cls, options, passes):
    params = make_params(torch.float32)
    counter = _Counter(optim.zo.ops)
    monkeypatch.setattr(optim.zo, "ops", counter)
    opt = cls(params, lr=1e-3, **options)
    opt.step(lambda: loss_fn(params, targets()))
    assert counter.elements == passes * sum(p.numel() for p in params)


@pytest.mark.skipif(DEVICE != "cpu" or "cpp" not in FAST_BACKENDS, reason="profiles the C++ CPU op")
@pytest.mark.parametrize("cls", [optim.ZOSGD, optim.AdaZO])
def test_zo_step_allocates_nothing_parameter_sized(cls):
    theta = torch.nn.Parameter(torch.randn(1 << 22))  # 16 MiB
    opt = cls([theta], lr=1e-6)
    closure = lambda: theta[:1000].square().sum()  # noqa: E731 -- the model's own memory is not ours
    opt.step(closure)  # AdaZO allocates its state once, here
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step(closure)
    allocated = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert max(allocated, default=0) < theta.numel() * 4 // 100


def test_loop_twin_does_allocate():
    """The allocation check can fail: the loop version materialises z."""
    theta = torch.nn.Parameter(torch.randn(1 << 20))
    opt = loop_twins.ZOSGD([theta], lr=1e-6)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step(lambda: theta[:1000].square().sum())
    assert max(e.cpu_memory_usage for e in prof.events()) >= theta.numel() * 4


def test_sophia_hessian_refresh_and_gnb_loss():
    params = make_params(torch.float32)
    opt = optim.SophiaG(params, lr=1e-2, update_period=2, hessian_batch_size=4)
    target = targets()
    run(opt, params, target, 1, hessian=True)
    assert all(torch.count_nonzero(opt.state[p]["hessian"]) == 0 for p in params)
    run(opt, params, target, 1, hessian=True)
    assert all(torch.count_nonzero(opt.state[p]["hessian"]) > 0 for p in params)
    assert all(p.grad is None for p in params)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    loss = optim.gnb_loss(logits)
    loss.backward()
    assert loss.ndim == 0 and math.isfinite(loss.item()) and logits.grad.abs().sum() > 0


def test_sophia_reads_the_closures_hessian_closure():
    """The loop's protocol: a closure may carry the Hessian's loss; SophiaG refreshes from it."""
    params, target = make_params(torch.float32), targets()

    def closure():
        return loss_fn(params, target)

    closure.hessian_closure = lambda: loss_fn(params, [t * 0.5 for t in target])
    opt = optim.SophiaG(params, lr=1e-2, update_period=1)
    optim.step(opt, closure)
    assert all(torch.count_nonzero(opt.state[p]["hessian"]) > 0 for p in params)


@pytest.mark.parametrize("case", [(name, i) for name, info in OPTIMIZERS.items()
                                  for i in range(len(info.error_inputs))], ids=str)
def test_bad_hyperparameters_are_named(case):
    name, i = case
    kwargs, message = OPTIMIZERS[name].error_inputs[i]
    params = make_params(torch.float32)
    with pytest.raises(UsageError, match=message):
        OPTIMIZERS[name].cls(params, **kwargs)


def test_zo_needs_a_closure_and_bad_dtypes_fail_before_any_write():
    p = [torch.nn.Parameter(torch.randn(4, dtype=torch.float64))]
    with pytest.raises(ValueError, match="needs a closure"):
        optim.ZOSGD(p).step()
    with pytest.raises(TypeError, match="dtype must be float32, bfloat16 or float16"):
        optim.ZOSGD(p).step(lambda: 1.0)


def test_state_dict_of_another_optimizer_is_refused():
    params = make_params(torch.float32)
    with pytest.raises(UsageError, match="not a AdaZO state dict"):
        optim.AdaZO(params).load_state_dict(torch.optim.Adam(params).state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optim.AdaZO(params).load_state_dict(optim.AdaZO(params).state_dict())


def test_mezo_reference_step_is_mezo():
    """The benchmarks' MeZO baseline: g from theta +- mu z with torch's own z, then the update."""
    p = torch.nn.Parameter(torch.randn(40, generator=torch.Generator().manual_seed(1)).to(DEVICE))
    theta = p.detach().clone()
    f = lambda x: float((x.double() ** 2).sum())  # noqa: E731
    mezo_step([p], lambda: f(p), lr=0.1, mu=1e-3, seed=3, weight_decay=0.01)
    torch.manual_seed(3)
    z = torch.normal(0, 1, size=(40,), device=DEVICE)
    plus = theta + 1e-3 * z  # each pass adds to what the last one left, in float32
    minus = plus + (-2e-3) * z
    restored = minus + 1e-3 * z
    g = (f(plus) - f(minus)) / 2e-3
    torch.testing.assert_close(p.detach(), restored - 0.1 * (g * z + 0.01 * restored), rtol=1e-6, atol=1e-7)
