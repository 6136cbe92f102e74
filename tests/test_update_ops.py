"""The fused optimizer updates `zo_update_` and `grad_update_` on every backend this machine can
run, against the pure-PyTorch reference, which is itself checked against hand formulas."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BACKENDS, DEVICE, DTYPES, FAST_BACKENDS, SHAPES
from seeds import fresh_seed

from zounlearn import rng
from zounlearn.ops import backends, flat_offsets, reference
from zounlearn.ops.rules import RULES, ZO_RULES, Hyper, Rule
from zounlearn.ops.update import grad_update_, zo_update_


def make(dtype: torch.dtype, rule: Rule, seed: int, state_dtype: torch.dtype = torch.float32):
    """Params, gradients and state (float32, or bfloat16: the lean state) of odd sizes with state
    values a few steps in could have."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda s, scale=1.0: (torch.randn(s, generator=gen) * scale).to(DEVICE)  # noqa: E731
    params = [rand(s).to(dtype) for s in SHAPES]
    grads = [rand(s).to(dtype) for s in SHAPES]
    m = [rand(s, 0.3).to(state_dtype) for s in SHAPES] if rule.uses_m else []
    v = [rand(s, 0.3).square().to(state_dtype) for s in SHAPES] if rule.uses_v else []
    return params, grads, m, v


def hyper(rule: Rule, bits: int = 3) -> Hyper:
    return Hyper.make(0.05, weight_decay=0.1, decoupled=rule is not Rule.SGD, beta1=0.9, beta2=0.99,
                      eps=1e-6, step=4, bits=bits, rho=0.04)


def clones(*lists):
    return [[t.clone() for t in ts] for ts in lists]


def assert_same(got, want, exact: bool, dtype: torch.dtype, max_flips: int = 0, seed: int = -1) -> None:
    """exact: bit for bit. Otherwise (Gaussian z agree to 1e-6): within 1e-5 plus one unit of
    the dtype, except at most max_flips elements whose sign-based update flipped at a tie."""
    for g, w in zip(got, want):
        if exact:
            assert torch.equal(g, w), f"seed {seed}"
            continue
        err = (g.float() - w.float()).abs()
        tol = 1e-5 + w.float().abs() * torch.finfo(dtype).eps
        assert int((err > tol).sum()) <= max_flips, f"seed {seed}: max error {err.max()}"


ROUNDING_STREAM = -(2**62) - 5  # any int64 stream; the optimizers' are 2^63 + n
STATE_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("backend", FAST_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", ZO_RULES, ids=lambda r: r.name)
@pytest.mark.parametrize("dist", rng.DISTRIBUTIONS)
@pytest.mark.parametrize("rounding", rng.ROUNDINGS)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES, ids=str)
def test_zo_update_equals_reference(backend, dtype, rule, dist, rounding, state_dtype):
    seed = fresh_seed()
    params, _, m, v = make(dtype, rule, seed, state_dtype)
    offsets = flat_offsets(params, start=2**32 - 333)
    coefs, streams = [0.7, -0.4, 0.2], [3, 2**40 + 1, 9]
    h = hyper(rule)
    want = clones(params, m, v)
    reference.zo_update_(*want, offsets, coefs, streams, 17, dist, 1e-3, rule.value, rounding, ROUNDING_STREAM, *h)
    got = clones(params, m, v)
    zo_update_(got[0], coefs, 17, streams, offsets, rule=rule, hyper=h, m=got[1], v=got[2], restore=1e-3,
               dist=dist, rounding=rounding, rounding_stream=ROUNDING_STREAM)
    exact = dist == "rademacher"
    # Gaussian z agree to 1e-6: a sign can flip at a tie, and Adam's m / sqrt(v) amplifies the
    # difference where v is near 0 (seed 1359219092: one element of 129 off by 1.1e-5).
    flips = 0 if exact else 3 * (rule in (Rule.SIGN, Rule.SIGN_ADAM)) + (rule in (Rule.ADAM, Rule.ADAZO))
    for g, w in zip(got, want):
        assert_same(g, w, exact, dtype if g is got[0] else state_dtype, flips, seed)


@pytest.mark.parametrize("backend", FAST_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", list(RULES), ids=lambda r: r.name)
@pytest.mark.parametrize("rounding", rng.ROUNDINGS)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES, ids=str)
def test_grad_update_equals_reference(backend, dtype, rule, rounding, state_dtype):
    seed = fresh_seed()
    params, grads, m, v = make(dtype, rule, seed, state_dtype)
    offsets = flat_offsets(params, start=77)
    h = hyper(rule)
    scales = None
    sr = (offsets, 23, rounding, ROUNDING_STREAM)
    if rule is Rule.QUANTIZED:  # the scales a moments pass would leave
        scales = torch.empty(len(params), device=DEVICE)
        reference.grad_update_(clones(params)[0], grads, clones(m)[0], clones(v)[0], scales, offsets, 23,
                               Rule.ADAM_MOMENTS.value, rounding, ROUNDING_STREAM, *h)
        scales[2] = 0.0  # the empty tensor
    elif rule is Rule.ADAM_MOMENTS:
        scales = torch.full((len(params),), 123.0, device=DEVICE)  # overwritten, not max-ed with
    want = clones(params, m, v) + [[scales.clone()] if scales is not None else []]
    reference.grad_update_(want[0], grads, want[1], want[2], want[3][0] if want[3] else None, sr[0], sr[1],
                           rule.value, rounding, ROUNDING_STREAM, *h)
    got = clones(params, m, v) + [[scales.clone()] if scales is not None else []]
    grad_update_(got[0], grads, rule=rule, hyper=h, m=got[1], v=got[2], scales=got[3][0] if got[3] else None,
                 offsets=offsets, seed=23, rounding=rounding, rounding_stream=ROUNDING_STREAM)
    for g, w in zip(got, want):
        assert_same(g, w, True, dtype, seed=seed)
    if rule is Rule.QUANTIZED:
        assert not torch.equal(got[0][0], params[0])


def test_reference_rules_match_hand_formulas():
    """The reference's rules against the formulas of docs/optimizers.md, written out in float64."""
    theta, g = torch.randn(500), torch.randn(500)
    m0, v0 = torch.randn(500) * 0.3, torch.rand(500)
    lr, wd, b1, b2, eps, t, rho = 0.05, 0.1, 0.9, 0.99, 1e-6, 4, 0.04
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    d = lambda x: x.double()  # noqa: E731
    m_adam = b1 * d(m0) + (1 - b1) * d(g)
    v_adam = b2 * d(v0) + (1 - b2) * d(g) ** 2
    u = (m_adam / bc1) / (v_adam.sqrt() / math.sqrt(bc2) + eps)
    m_sgd = b1 * d(m0) + d(g) + wd * d(theta)
    v_adazo = b2 * d(v0) + (1 - b2) * m_adam**2
    expected = {
        Rule.SGD: (d(theta) - lr * m_sgd, m_sgd),
        Rule.SIGN: (d(theta) - lr * (torch.sign(d(g)) + wd * d(theta)), None),
        Rule.ADAM: ((1 - lr * wd) * d(theta) - lr * u, m_adam),
        Rule.ADAZO: ((1 - lr * wd) * d(theta) - lr * m_adam / (v_adazo.sqrt() + eps), m_adam),
        Rule.SIGN_ADAM: ((1 - lr * wd) * d(theta) - lr * torch.sign(m_adam), m_adam),
        Rule.SOPHIA: ((1 - lr * wd) * d(theta)
                      - lr * torch.sign(m_adam) * torch.clamp(m_adam.abs() / (rho * d(v0) + eps), max=1), m_adam),
    }
    for rule, (want_theta, want_m) in expected.items():
        p, m, v = theta.clone(), m0.clone(), v0.clone()
        h = Hyper.make(lr, weight_decay=wd, decoupled=rule is not Rule.SGD, beta1=b1, beta2=b2, eps=eps, step=t,
                       rho=rho)
        reference.grad_update_([p], [g], [m] if rule.uses_m else [], [v] if rule.uses_v else [], None, [0], 0,
                               rule.value, "nearest", 0, *h)
        torch.testing.assert_close(p.double(), want_theta, rtol=1e-5, atol=1e-6, msg=rule.name)
        if want_m is not None:
            torch.testing.assert_close(m.double(), want_m, rtol=1e-5, atol=1e-6, msg=rule.name)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quantized_step_takes_the_promised_levels(bits):
    """Compressed Adam's step lr * Q(u): 2^(bits-1) - 1 levels of max |u| (sign for bits = 1)."""
    theta, g = torch.zeros(1000), torch.randn(1000)
    m, v = torch.zeros(1000), torch.zeros(1000)
    h = Hyper.make(1.0, beta1=0.9, beta2=0.99, eps=1e-8, step=1, bits=bits)
    scales = torch.zeros(1)
    reference.grad_update_([theta.clone()], [g], [m], [v], scales, [0], 0, Rule.ADAM_MOMENTS.value, "nearest", 0, *h)
    u = g.sign()  # step 1 of Adam: m / bc1 / sqrt(v / bc2) = g / |g|
    assert scales.item() == pytest.approx(1.0, abs=1e-6)
    reference.grad_update_([theta], [g], [m], [v], scales, [0], 0, Rule.QUANTIZED.value, "nearest", 0, *h)
    levels = 2 ** (bits - 1) - 1
    if levels == 0:
        assert torch.equal(theta, -u)
    else:
        steps = (-theta / scales) * levels
        assert torch.allclose(steps, steps.round(), atol=1e-5) and steps.abs().max() <= levels + 1e-5
        assert torch.equal(theta.sign(), -u)


def test_all_zero_tensor_quantizes_to_zero():
    theta = torch.ones(10)
    h = Hyper.make(0.1, beta1=0.9, beta2=0.99, bits=4)
    reference.grad_update_([theta], [torch.zeros(10)], [torch.zeros(10)], [torch.zeros(10)], torch.zeros(1), [0], 0,
                           Rule.QUANTIZED.value, "nearest", 0, *h)
    assert torch.equal(theta, torch.ones(10))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_zo_update_restores_and_updates_in_one_pass(backend):
    """ZO-SignSGD from theta - mu z: the restore + mu z_last happens before the rule."""
    theta = torch.randn(1000, device=DEVICE)
    mu = 1e-3
    x = theta.clone()
    reference.perturb_([x], [0], [-mu], [5], 3, "rademacher", 1.0)
    zo_update_([x], [2.0], 3, [5], [0], rule=Rule.SIGN, hyper=Hyper.make(0.01), restore=mu)
    z = rng.sample(3, 5, 0, 1000, device=DEVICE)
    torch.testing.assert_close(x, theta - 0.01 * z, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_bad_state_raises_before_any_write(backend):
    p = [torch.randn(10, device=DEVICE), torch.randn(20, device=DEVICE)]
    m = [torch.zeros(10, device=DEVICE), torch.zeros(20, dtype=torch.float16, device=DEVICE)]
    before = [t.clone() for t in p]
    with pytest.raises(ValueError, match=r"m\[1\] must be a contiguous torch.float32 tensor"):
        grad_update_(p, p, rule=Rule.SIGN_ADAM, hyper=Hyper.make(0.1), m=m)
    with pytest.raises(ValueError, match="keeps no m state"):
        zo_update_(p, [1.0], 0, [0], [0, 10], rule=Rule.SIGN, hyper=Hyper.make(0.1), m=[m[0], m[0]])
    state = [torch.zeros_like(t) for t in p]
    with pytest.raises(ValueError, match="needs scales"):
        grad_update_(p, p, rule=Rule.QUANTIZED, hyper=Hyper.make(0.1), m=state, v=state)
    with pytest.raises(ValueError, match="first-order only"):
        zo_update_(p, [1.0], 0, [0], [0, 10], rule=Rule.ADAM_MOMENTS, hyper=Hyper.make(0.1), m=state, v=state)
    assert all(torch.equal(a, b) for a, b in zip(p, before))


def test_update_ops_opcheck():
    p, g = [torch.randn(300)], [torch.randn(300)]
    m, v = [torch.zeros(300)], [torch.ones(300)]
    h = Hyper.make(0.1, beta1=0.9, beta2=0.99)
    torch.library.opcheck(torch.ops.zounlearn.zo_update_.default,
                          (p, m, v, [0], [0.5], [1], 3, "rademacher", 1e-3, "adazo", "stochastic", 5, *h))
    torch.library.opcheck(torch.ops.zounlearn.grad_update_.default,
                          (p, g, m, v, torch.zeros(1), [0], 3, "adam_moments", "nearest", 5, *h))
    torch.library.opcheck(torch.ops.zounlearn.perturb_into.default,
                          (p, [torch.empty(300)], [7], [0.5], [1], 3, "gaussian", 0.5))


def test_schema_names_every_scalar():
    """The ops' schemas name the rules' scalars (no positional array of floats) in Hyper's order."""
    schema = torch.ops.zounlearn.zo_update_.default._schema
    names = [a.name for a in schema.arguments]
    assert names[-len(Hyper._fields):] == list(Hyper._fields)
    assert "backend" not in names and "hyper" not in names


@pytest.mark.skipif(not backends.runs_on("cpp", "cpu"), reason="C++ extension not built")
def test_compiled_rule_table_is_the_registry():
    """csrc/update_rules.h's table and Hyper's field order, as compiled, against zounlearn.ops.rules."""
    import zounlearn._C_cpu as ext

    compiled = [(name, rm, rv, wm, wv, zo) for name, rm, rv, wm, wv, zo in ext.rules()]
    assert compiled == [(r.value, i.reads_m, i.reads_v, i.writes_m, i.writes_v, i.zeroth_order)
                        for r, i in RULES.items()]
    assert ext.hyper_fields() == list(Hyper._fields)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("op", ["zo_update_", "grad_update_"])
def test_updates_bump_the_version_counter(op, backend):
    """Autograd refuses a parameter an update changed after it was saved for backward."""
    x = torch.ones(5, device=DEVICE, requires_grad=True)
    y = x * 1.0
    loss = (y * y).sum()
    m, v = [torch.zeros(5, device=DEVICE)], [torch.ones(5, device=DEVICE)]
    h = Hyper.make(0.1, beta1=0.9, beta2=0.99)
    if op == "zo_update_":
        zo_update_([y], [1.0], 0, [0], [0], rule=Rule.ADAM, hyper=h, m=m, v=v)
    else:
        grad_update_([y], [torch.ones(5, device=DEVICE)], rule=Rule.ADAM, hyper=h, m=m, v=v)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
