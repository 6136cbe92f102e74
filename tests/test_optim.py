"""The optimizers against their pure-PyTorch loop versions (zounlearn.optim.reference), the
ZO estimator against autograd, convergence, the state dict round trip, and the step's
contract (skips, errors, frozen parameters, pass count, memory)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from zounlearn import optim, sample
from zounlearn.ops import backends
from zounlearn.optim import reference
from zounlearn.optim.base import loss_value

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [n for n, why in backends.status().items() if why is None and backends.runs_on(n, DEVICE)]
SHAPES = [(7, 13), (129,), (5, 3, 7), (300,)]

# name: (class, per-group options for 2 groups, optimizer-wide options)
ZO = {
    "ZOSGD": (optim.ZOSGD, [{"lr": 2e-2}, {"lr": 1e-2, "weight_decay": 0.1}], {}),
    "ZOSGD-momentum": (optim.ZOSGD, [{"lr": 1e-2, "momentum": 0.9}, {"lr": 5e-3, "momentum": 0.5, "weight_decay": 0.1}],
                       {"queries": 3}),
    "ZOSignSGD": (optim.ZOSignSGD, [{"lr": 1e-2}, {"lr": 2e-2, "weight_decay": 0.1}], {"dist": "gaussian"}),
    "ZOAdam": (optim.ZOAdam, [{"lr": 1e-2}, {"lr": 2e-2, "betas": (0.8, 0.99), "weight_decay": 0.1}],
               {"estimator": "forward", "queries": 2}),
    "AdaZO": (optim.AdaZO, [{"lr": 1e-2}, {"lr": 3e-2, "betas": (0.8, 0.9), "eps": 1e-6}], {"dist": "sphere"}),
}
FO = {
    "SignSGD": (optim.SignSGD, [{"lr": 1e-2}, {"lr": 2e-2, "weight_decay": 0.1}], {}),
    "SignAdam": (optim.SignAdam, [{"lr": 1e-2}, {"lr": 2e-2, "beta": 0.5, "weight_decay": 0.1}], {}),
    "CompressedAdam": (optim.CompressedAdam, [{"lr": 1e-2}, {"lr": 2e-2, "bits": 2, "weight_decay": 0.1}], {"bits": 4}),
    "CompressedAdam-1bit": (optim.CompressedAdam, [{"lr": 1e-2}, {"lr": 2e-2, "betas": (0.8, 0.9)}], {"bits": 1}),
    "SophiaG": (optim.SophiaG, [{"lr": 1e-2}, {"lr": 2e-2, "rho": 0.1}], {"update_period": 2, "hessian_batch_size": 8}),
}
ALL = {**ZO, **FO}


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


def build(cls, groups, options, params, **extra):
    # Two groups: tensors 0, 2 and tensors 1, 3.
    param_groups = [{"params": [params[0], params[2]], **groups[0]}, {"params": [params[1], params[3]], **groups[1]}]
    return cls(param_groups, **{**options, **extra})


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


def state_tensors(opt) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for p in opt.param_groups for q in p["params"] for k, v in sorted(opt.state[q].items())
            if isinstance(v, torch.Tensor)]


def assert_close_dtype(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """float32: tight. Half types: within 2 units of the dtype, except a bounded 1% of elements
    (a sign update flips at a tie, or one rounding lands the other way, and later steps follow)."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6, msg=what)
        return
    ulp = torch.finfo(dtype).eps * want.float().abs().clamp(min=1e-2)
    off = ((got.float() - want.float()).abs() > 2 * ulp).sum().item()
    assert off <= max(1, want.numel() // 100), f"{what}: {off} of {want.numel()} elements differ"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(ALL))
def test_equals_reference_loop(name, dtype, backend):
    cls, groups, options = ALL[name]
    ref_cls = getattr(reference, cls.__name__)
    if name in ZO:
        options = {**options, "seed": 2**40 + 3, "mu": 1e-2 if dtype == torch.float32 else 5e-2}
    target = targets()
    fused_params, ref_params = make_params(dtype), make_params(dtype)
    fused = build(cls, groups, options, fused_params, backend=backend)
    ref = build(ref_cls, groups, options, ref_params)
    hessian = cls is optim.SophiaG
    for step in range(7):
        fused_loss = run(fused, fused_params, target, 1, hessian)
        ref_loss = run(ref, ref_params, target, 1, hessian)
        assert fused_loss == pytest.approx(ref_loss, rel=1e-4), step
        if name in ZO:
            assert fused.last_projected_grads == pytest.approx(ref.last_projected_grads, rel=1e-3, abs=1e-3)
    for i, (a, b) in enumerate(zip(fused_params, ref_params)):
        assert not torch.equal(a, make_params(dtype)[i]), "the optimizer did not move the parameters"
        assert_close_dtype(a.detach(), b.detach(), dtype, f"param {i}")
    fused_state, ref_state = state_tensors(fused), state_tensors(ref)
    assert [k for k, _ in fused_state] == [k for k, _ in ref_state]
    assert bool(fused_state) == (name not in ("ZOSGD", "ZOSignSGD", "SignSGD"))
    for (key, a), (_, b) in zip(fused_state, ref_state):
        assert a.dtype == torch.float32
        # State is float32 for every parameter dtype; half parameters feed it rounded values.
        assert_close_dtype(a, b, torch.float32 if dtype == torch.float32 else dtype, key)


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


# (class, options, steps, factor): the loss must fall below factor * initial within steps.
CONVERGENCE = {
    "ZOSGD": (optim.ZOSGD, {"lr": 0.02, "mu": 1e-3}, 300, 0.3),
    "ZOSGD-momentum": (optim.ZOSGD, {"lr": 0.005, "momentum": 0.9, "mu": 1e-3}, 300, 0.3),
    "ZOSignSGD": (optim.ZOSignSGD, {"lr": 0.01, "mu": 1e-3, "queries": 4}, 300, 0.3),
    "ZOAdam": (optim.ZOAdam, {"lr": 0.03, "mu": 1e-3, "queries": 4}, 300, 0.3),
    "AdaZO": (optim.AdaZO, {"lr": 0.03, "mu": 1e-3, "queries": 4}, 300, 0.3),
    "SignSGD": (optim.SignSGD, {"lr": 0.01}, 100, 0.1),
    "SignAdam": (optim.SignAdam, {"lr": 0.01}, 100, 0.1),
    "CompressedAdam": (optim.CompressedAdam, {"lr": 0.02, "bits": 4}, 100, 0.1),
    "SophiaG": (optim.SophiaG, {"lr": 0.02, "weight_decay": 0.0}, 100, 0.1),
    "HybridFOZO": (optim.HybridFOZO, {"fo_lr": 0.05, "zo_lr": 1e-3, "block": 10, "total_steps": 100}, 100, 0.1),
}


@pytest.mark.parametrize("name", list(CONVERGENCE))
def test_lowers_regression_loss(name):
    """Least squares on 20 features: a stated factor within a stated number of steps."""
    cls, options, steps, factor = CONVERGENCE[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 20, generator=gen).to(DEVICE)
    y = x @ torch.randn(20, generator=gen).to(DEVICE)
    w = torch.nn.Parameter(torch.zeros(20, device=DEVICE))
    loss = lambda: ((x @ w - y) ** 2).mean()  # noqa: E731
    start = loss().item()
    opt = cls([w], **options)
    for _ in range(steps):
        opt.step(loss)
    assert loss().item() < factor * start, (loss().item(), start)


def _fresh(name, backend, params):
    cls, groups, options = ALL[name]
    extra = {"seed": 9, "mu": 1e-2} if name in ZO else {}
    return build(cls, groups, options, params, backend=backend, **extra)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(ALL))
def test_state_dict_round_trip_is_bit_identical(name, backend):
    target = targets()
    params = make_params(torch.bfloat16)
    opt = _fresh(name, backend, params)
    hessian = ALL[name][0] is optim.SophiaG
    run(opt, params, target, 3, hessian)
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    run(opt, params, target, 4, hessian)

    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = _fresh(name, backend, resumed)
    opt2.load_state_dict(saved_state)
    run(opt2, resumed, target, 4, hessian)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    for (k, a), (_, b) in zip(state_tensors(opt), state_tensors(opt2)):
        assert a.dtype == torch.float32 and torch.equal(a, b), k


def test_hybrid_schedule_ends_on_zo_and_keeps_inner_state():
    params = make_params(torch.float32)
    target = targets()
    opt = optim.HybridFOZO(params, block=3, zo_block=2, total_steps=12, fo_lr=1e-2, zo_lr=1e-2)
    # Counted from the end: ZO ZO | FO FO FO | ZO ZO | FO FO FO | ZO ZO ... for 12 steps.
    assert "".join(opt.phase(t)[0] for t in range(12)) == "zzfffzzfffzz"
    phases = []
    for _ in range(12):
        opt.step(lambda: loss_fn(params, target))
        phases.append(opt.last_phase[0])
    assert phases == list("zzfffzzfffzz")
    assert opt.zo.steps == 6 and all(s["step"].item() == 6 for s in opt.fo.state.values())
    assert all(p.grad is None for p in params), "gradients are freed after each first-order step"
    unbounded = optim.HybridFOZO(make_params(torch.float32))
    assert [unbounded.phase(t) for t in (0, 19, 20, 39, 40)] == ["fo", "fo", "zo", "zo", "fo"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hybrid_round_trip_mid_block(backend):
    target = targets()

    def fresh(params):
        return optim.HybridFOZO(
            params, block=3, total_steps=10, fo_optimizer=lambda ps: optim.SignAdam(ps, lr=1e-2, backend=backend),
            zo_optimizer=lambda ps: optim.AdaZO(ps, lr=1e-2, mu=1e-2, seed=4, backend=backend))

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


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", list(ZO))
def test_non_finite_loss_skips_the_step(name, bad):
    target = targets()
    params = make_params(torch.float32)
    opt = _fresh(name, None, params)
    run(opt, params, target, 2)
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    calls = []

    def closure():
        calls.append(1)
        return bad if len(calls) == 2 else loss_fn(params, target)

    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        opt.step(closure)
    for a, b in zip(params, before):  # undone within the restore's rounding
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=2 * torch.finfo(torch.float32).eps * (b.abs().max().item() + 1e-2))
    after = opt.state_dict()
    assert after["zounlearn"] == state["zounlearn"]
    for k in state["state"]:
        for key, value in state["state"][k].items():
            assert torch.equal(after["state"][k][key], value)


@pytest.mark.parametrize("name", ["ZOSGD", "AdaZO"])
def test_closure_errors_restore_the_parameters(name):
    params = make_params(torch.float32)
    before = [p.detach().clone() for p in params]
    opt = _fresh(name, None, params)
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
    assert opt.steps == 0 and opt.draws == 0


@pytest.mark.parametrize("name", list(ALL))
def test_frozen_parameters_are_never_touched(name):
    params = make_params(torch.float32)
    params[1].requires_grad_(False)
    frozen = params[1].detach().clone()
    opt = _fresh(name, None, params)
    run(opt, params, targets(), 3, ALL[name][0] is optim.SophiaG)
    assert torch.equal(params[1].detach(), frozen)
    assert not torch.equal(params[0].detach(), make_params(torch.float32)[0])


class _Counter:
    """Counts the elements each kernel call touches, passing the call on."""

    def __init__(self, kernels):
        self.kernels, self.elements = kernels, 0

    def __getattr__(self, name):
        fn = getattr(self.kernels, name)

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
    counter = _Counter(backends.select(DEVICE)[1])
    monkeypatch.setattr(optim.zo.CountedOptimizer, "_kernels", lambda self, device: counter)
    opt = cls(params, lr=1e-3, **options)
    opt.step(lambda: loss_fn(params, targets()))
    assert counter.elements == passes * sum(p.numel() for p in params)


@pytest.mark.skipif(DEVICE != "cpu" or backends.status()["cpp"] is not None, reason="profiles the C++ CPU op")
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


def test_reference_loop_does_allocate():
    """The allocation check can fail: the loop version materialises z."""
    theta = torch.nn.Parameter(torch.randn(1 << 20))
    opt = reference.ZOSGD([theta], lr=1e-6)
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


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: optim.ZOSGD(p, lr=-1.0), "invalid lr"),
        (lambda p: optim.ZOSGD(p, queries=9), "queries must be an int from 1 to 8"),
        (lambda p: optim.AdaZO(p, dist="uniform"), "dist must be one of"),
        (lambda p: optim.ZOAdam(p, estimator="backward"), "estimator must be one of"),
        (lambda p: optim.ZOSGD(p, mu=0.0), "invalid mu"),
        (lambda p: optim.CompressedAdam(p, bits=0), "bits must be an int"),
        (lambda p: optim.SignAdam(p, beta=1.5), "invalid beta"),
        (lambda p: optim.SophiaG(p, update_period=0), "update_period must be a positive int"),
        (lambda p: optim.HybridFOZO(p, block=0), "block must be a positive int"),
    ],
)
def test_bad_hyperparameters_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make(make_params(torch.float32))


def test_zo_needs_a_closure_and_bad_dtypes_fail_before_any_write():
    p = [torch.nn.Parameter(torch.randn(4, dtype=torch.float64))]
    with pytest.raises(ValueError, match="needs a closure"):
        optim.ZOSGD(p).step()
    with pytest.raises(TypeError, match="dtype must be float32, bfloat16 or float16"):
        optim.ZOSGD(p).step(lambda: 1.0)


def test_state_dict_of_another_optimizer_is_refused():
    params = make_params(torch.float32)
    with pytest.raises(ValueError, match="no 'zounlearn' counters"):
        optim.AdaZO(params).load_state_dict(torch.optim.Adam(params).state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optim.AdaZO(params).load_state_dict(optim.AdaZO(params).state_dict())


def test_mezo_reference_step_is_mezo():
    """The benchmarks' MeZO baseline: g from theta +- mu z with torch's own z, then the update."""
    p = torch.nn.Parameter(torch.randn(40, generator=torch.Generator().manual_seed(1)).to(DEVICE))
    theta = p.detach().clone()
    f = lambda x: float((x.double() ** 2).sum())  # noqa: E731
    reference.mezo_step([p], lambda: f(p), lr=0.1, mu=1e-3, seed=3, weight_decay=0.01)
    torch.manual_seed(3)
    z = torch.normal(0, 1, size=(40,), device=DEVICE)
    plus = theta + 1e-3 * z  # each pass adds to what the last one left, in float32
    minus = plus + (-2e-3) * z
    restored = minus + 1e-3 * z
    g = (f(plus) - f(minus)) / 2e-3
    torch.testing.assert_close(p.detach(), restored - 0.1 * (g * z + 0.01 * restored), rtol=1e-6, atol=1e-7)
