"""Lean state: the fused optimizers' m and v in bfloat16 (state_dtype="bfloat16", docs/memory.md).

The ops' bit-for-bit agreement of every backend with the reference, bfloat16 state included, is
tests/test_update_ops.py's (and tests/test_cpu_kernel_isa.py's for the CPU builds); here: the
reference against the documented rounding words, that stochastic rounding of the state is
unbiased and independent of the parameters', the optimizers against their float32 twins within
a derived bound, the memory, the state-dict round trip and the errors."""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import BACKENDS, DEVICE
from seeds import fresh_seed

from zounlearn import optim, rng
from zounlearn.cli.inputs import key_values
from zounlearn.errors import UsageError
from zounlearn.ops import flat_offsets, reference
from zounlearn.ops.rules import Hyper, Rule
from zounlearn.ops.update import grad_update_
from zounlearn.optim.registry import check_optimizer_options, make_optimizer

BF16_EPS = 2.0**-7  # a bfloat16 unit in the last place is at most this times |x| (8 significant bits)



# Optimizers with moments: (name, class, options, the states that are linear in their gradient
# sequence (m = b m + c g): the ones the float32-twin bound below holds for, with their beta).
LEAN = [
    ("AdamW", optim.AdamW, {"betas": (0.9, 0.99)}, {"exp_avg": 0.9, "exp_avg_sq": 0.99}),
    ("SGD", optim.SGD, {"momentum": 0.9}, {"momentum_buffer": 0.9}),
    ("SignAdam", optim.SignAdam, {"beta": 0.8}, {"exp_avg": 0.8}),
    ("CompressedAdam", optim.CompressedAdam, {"bits": 3, "betas": (0.9, 0.99)}, {"exp_avg": 0.9, "exp_avg_sq": 0.99}),
    ("ZOAdam", optim.ZOAdam, {"betas": (0.9, 0.99), "mu": 1e-2, "seed": 3}, {"exp_avg": 0.9, "exp_avg_sq": 0.99}),
    # AdaZO's v tracks m^2, so m's rounding errors reach it: only m is linear.
    ("AdaZO", optim.AdaZO, {"betas": (0.9, 0.99), "mu": 1e-2, "seed": 3}, {"exp_avg": 0.9}),
    ("ZOSGD", optim.ZOSGD, {"momentum": 0.9, "mu": 1e-2, "seed": 3}, {"momentum_buffer": 0.9}),
    ("ZOSignAdam", optim.ZOSignAdam, {"beta": 0.8, "mu": 1e-2, "seed": 3}, {"exp_avg": 0.8}),
]
SIZES = [(37, 11), (129,), (5, 3, 7), (300,)]  # odd, none a multiple of a Philox group


def problem(seed: int):
    """Parameters and a loss-only closure: a least-squares fit, the same for every optimizer."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in SIZES]
    targets = [torch.randn(s, generator=gen).to(DEVICE) for s in SIZES]

    def closure():
        return sum(((p - t) ** 2).sum() for p, t in zip(params, targets))

    return params, closure


def run(cls, options, state_dtype, seed, steps, lr=0.0):
    """The optimizer after `steps` steps and, per state key and parameter, each step's value."""
    params, closure = problem(seed)
    opt = cls(params, lr=lr, state_dtype=state_dtype, **options)
    history = []
    for _ in range(steps):
        opt.step(closure)
        history.append({k: [opt.state[p][k].float().clone() for p in params]
                        for k in opt.state[params[0]] if k != "step"})
    return opt, params, history


@pytest.mark.parametrize(("name", "cls", "options", "linear"), LEAN, ids=[c[0] for c in LEAN])
def test_lean_state_is_bfloat16_and_half_the_bytes(name, cls, options, linear):
    """Would fail if the state were silently float32: dtype and bytes of every state tensor."""
    numel = sum(math.prod(s) for s in SIZES)
    for state_dtype, size in (("bfloat16", 2), ("float32", 4)):
        opt, params, _ = run(cls, options, state_dtype, 1, 2, lr=1e-3)
        states = [v for p in params for k, v in opt.state[p].items() if k != "step"]
        assert {t.dtype for t in states} == {getattr(torch, state_dtype)}
        keys = len(states) // len(params)
        assert sum(t.nbytes for t in states) == size * keys * numel


@pytest.mark.parametrize(("name", "cls", "options", "linear"), LEAN, ids=[c[0] for c in LEAN])
def test_lean_state_within_its_bound_of_the_float32_twin(name, cls, options, linear):
    """At lr = 0 both runs see the same gradients (or ZO estimates) every step, so a linear state
    m_k = b m_(k-1) + c g_k differs from its float32 twin by e_N = sum_k b^(N-k) d_k, d_k the
    rounding error of step k: zero-mean (stochastic rounding) and |d_k| < ulp(m_k) <= 2^-7 |m_k|,
    so Var d_k <= (2^-7 M)^2 / 4 with M the element's largest |m_k| in either run, and
    sigma^2 = (2^-7 M / 2)^2 sum_(j<N) b^(2j) bounds Var e_N. Over the elements (independent
    words): mean (e / sigma)^2 <= 1 (allowed 1.5, > 10 standard errors above) and
    |mean e / sigma| <= 1 / sqrt(n) (allowed 5 / sqrt(n)). Round-to-nearest-even gives the
    second a bias-free pass too, but rounding toward zero fails both by far."""
    seed, steps = fresh_seed(), 20
    lean, _, lean_history = run(cls, options, "bfloat16", seed, steps)
    _, _, twin_history = run(cls, options, "float32", seed, steps)
    for key, beta in linear.items():
        scale = math.sqrt(sum(beta ** (2 * j) for j in range(steps))) / 2
        big = [torch.stack([torch.maximum(a[key][i].abs(), b[key][i].abs()) for a, b in
                            zip(lean_history, twin_history)]).amax(0) for i in range(len(SIZES))]
        err = torch.cat([(lean_history[-1][key][i] - twin_history[-1][key][i]).reshape(-1) for i in range(len(SIZES))])
        sigma = torch.cat([(b * BF16_EPS * scale).reshape(-1) for b in big])
        keep = sigma > 0
        z = err[keep] / sigma[keep]
        n = z.numel()
        assert n > 900
        assert float(z.square().mean()) <= 1.5, f"{key} (seed {seed})"
        assert abs(float(z.mean())) <= 5 / math.sqrt(n), f"{key} (seed {seed})"
        assert float(err.abs().max()) > 0, f"{key}: no rounding at all (seed {seed})"


def test_reference_rounds_state_with_the_documented_words():
    """The oracle against docs/rng.md: bfloat16 m and v are the float32 rule's m and v rounded by
    rng.round_stochastic with the words of rounding_stream ^ 2^62 (m) and ^ 2^61 (v)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in SIZES]
    grads = [torch.randn(s, generator=gen) for s in SIZES]
    m = [(torch.randn(s, generator=gen) * 0.3).bfloat16() for s in SIZES]
    v = [torch.rand(s, generator=gen).bfloat16() for s in SIZES]
    offsets, stream = flat_offsets(params, start=1000), rng.ROUNDING_STREAM_BASE + 7
    h = Hyper.make(0.01, beta1=0.9, beta2=0.99, step=3)
    lean = [[t.clone() for t in ts] for ts in (params, m, v)]
    signed = stream - 2**64  # the int64 the ops carry
    reference.grad_update_(lean[0], grads, lean[1], lean[2], None, offsets, 11, "adam", "stochastic", signed, *h)
    wide = [[t.clone() for t in params], [t.float() for t in m], [t.float() for t in v]]
    reference.grad_update_(wide[0], grads, wide[1], wide[2], None, offsets, 11, "adam", "stochastic", signed, *h)
    for kind, got, want in (("m", lean[1], wide[1]), ("v", lean[2], wide[2])):
        for t, w, off in zip(got, want, offsets):
            bits = rng.rounding_bits(11, rng.state_rounding_stream(stream, kind), off, w.numel())
            assert torch.equal(t.reshape(-1), rng.round_stochastic(w.reshape(-1), bits, torch.bfloat16)), kind
    assert all(torch.equal(a, b) for a, b in zip(lean[0], wide[0]))  # theta from the same float32 math


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_state_rounding_is_unbiased_and_independent(backend):
    """m and v of 1 each gain 2^-10, an eighth of bfloat16's unit at 1 (below half of it, so
    round-to-nearest would lose it every time). Stochastic rounding must keep it in expectation
    (mean within 5 standard errors of 2^-10), with m's and v's words independent (both rounded up
    on about 1/64 of the elements, not 1/8) and independent of the parameter's (bfloat16, also
    gaining an eighth of its unit)."""
    n, tiny = 1 << 16, 2.0**-10
    p = [torch.ones(n, dtype=torch.bfloat16, device=DEVICE)]
    g = [torch.ones(n, dtype=torch.bfloat16, device=DEVICE)]
    m = [torch.ones(n, dtype=torch.bfloat16, device=DEVICE)]
    v = [torch.ones(n, dtype=torch.bfloat16, device=DEVICE)]
    # m = 1 m + 2^-10 g, v = 1 v + 2^-10 g^2, theta = theta - (-2^-10) sign-free u with u = m / sqrt(v) ~ 1.
    h = Hyper.make(1.0)._replace(lr=-tiny, decay=1.0, beta1=1.0, one_minus_beta1=tiny, beta2=1.0,
                                 one_minus_beta2=tiny, eps=0.0, bias_correction1=1.0, sqrt_bias_correction2=1.0)
    grad_update_(p, g, rule=Rule.ADAM, hyper=h, m=m, v=v, seed=fresh_seed(), rounding="stochastic",
                 rounding_stream=rng.ROUNDING_STREAM_BASE - 2**64 + 5)
    p_up, m_up, v_up = (t[0].float() > 1.0 for t in (p, m, v))
    expected_up = tiny / BF16_EPS  # 1/8
    se = math.sqrt(expected_up * (1 - expected_up) / n)
    for name, up, t in (("m", m_up, m), ("v", v_up, v)):
        assert abs(float((t[0].float() - 1.0).mean()) - tiny) <= 5 * se * BF16_EPS, name
        assert set(t[0].float().unique().tolist()) <= {1.0, 1.0 + BF16_EPS}, name
    pair = expected_up**2
    pair_se = math.sqrt(pair * (1 - pair) / n)
    for a, b in ((m_up, v_up), (m_up, p_up), (v_up, p_up)):
        assert abs(float((a & b).float().mean()) - pair) <= 5 * pair_se


def test_nearest_rounding_of_state_loses_what_is_below_half_a_unit():
    """The contrast that makes the test above able to fail: rounding='nearest' keeps m at 1."""
    m = [torch.ones(4096, dtype=torch.bfloat16)]
    h = Hyper.make(0.0, decoupled=False, beta1=1.0)
    grad_update_([torch.zeros(4096)], [torch.full((4096,), 2.0**-10)], rule=Rule.SGD, hyper=h, m=m,
                 rounding="nearest")
    assert torch.equal(m[0], torch.ones(4096, dtype=torch.bfloat16))


@pytest.mark.parametrize("name", ["AdamW", "SGD", "ZOAdam", "ZOSignAdam"])
def test_lean_state_dict_round_trips_bit_identically(name):
    """Save after 3 steps (through torch.save), load into a fresh optimizer, take 3 more steps on
    both: parameters and bfloat16 state bit-identical, and the loaded state still bfloat16."""
    _, cls, options, _ = next(c for c in LEAN if c[0] == name)
    seed = fresh_seed()
    params, closure = problem(seed)
    params = [torch.nn.Parameter(p.detach().bfloat16()) for p in params]  # stochastic parameter rounding too
    opt = cls(params, lr=1e-2, state_dtype="bfloat16", **options)
    for _ in range(3):
        opt.step(closure)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = cls(copies, lr=1e-2, state_dtype="bfloat16", **options)
    other.load_state_dict(torch.load(buffer, weights_only=False))
    for p, q in zip(params, copies):
        for key, value in opt.state[p].items():
            if key != "step":
                assert other.state[q][key].dtype == torch.bfloat16
                assert torch.equal(other.state[q][key].view(torch.int16), value.view(torch.int16))

    def closure_of(ps):
        targets = [torch.full_like(p, 0.5) for p in ps]
        return lambda: sum(((p.float() - t.float()) ** 2).sum() for p, t in zip(ps, targets))

    for _ in range(3):
        opt.step(closure_of(params))
        other.step(closure_of(copies))
    for p, q in zip(params, copies):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))
        for key, value in opt.state[p].items():
            if key != "step":
                assert torch.equal(other.state[q][key].view(torch.int16), value.view(torch.int16))


def test_lean_state_in_backward_is_the_normal_path():
    """Updates inside backward, with update_clip (which reads m and v), keep the normal path's bits."""
    results = []
    for in_backward in (False, True):
        params, closure = problem(5)
        opt = optim.AdamW(params, lr=1e-2, state_dtype="bfloat16")
        for group in opt.param_groups:
            group["update_clip"] = 0.5
        if in_backward:
            opt.update_in_backward()
        for _ in range(3):
            opt.step(closure)
        results.append([t.clone() for p in params for t in (p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_bad_state_dtypes_are_clear_errors():
    params = [torch.nn.Parameter(torch.randn(10))]
    with pytest.raises(UsageError, match="state_dtype must be one of 'float32', 'bfloat16', 'int8', got 'float16'"):
        optim.AdamW(params, state_dtype="float16")
    with pytest.raises(UsageError, match="SophiaG keeps float32 state"):
        optim.SophiaG(params, state_dtype="bfloat16")
    # A group switched to another state_dtype after its state exists: refused before any write.
    opt = optim.AdamW(params, lr=0.1, state_dtype="bfloat16")
    params[0].grad = torch.ones(10)
    opt.step()
    before = [params[0].detach().clone(), opt.state[params[0]]["exp_avg"].clone()]
    opt.param_groups[0]["state_dtype"] = "float32"
    with pytest.raises(UsageError, match=r"'exp_avg' state .* is torch.bfloat16 but its group's state_dtype is"):
        opt.step()
    assert torch.equal(params[0], before[0]) and torch.equal(opt.state[params[0]]["exp_avg"], before[1])
    # A state dict whose tensors are not its groups' state_dtype.
    opt.param_groups[0]["state_dtype"] = "bfloat16"
    saved = opt.state_dict()
    saved["state"][0]["exp_avg"] = saved["state"][0]["exp_avg"].float()
    fresh = optim.AdamW([torch.nn.Parameter(torch.randn(10))], state_dtype="bfloat16")
    with pytest.raises(UsageError, match="'exp_avg' is torch.float32 but its group's state_dtype is 'bfloat16'"):
        fresh.load_state_dict(saved)
    assert not fresh.state
    # The ops: m and v of one call share one dtype, float32 or bfloat16.
    p = [torch.randn(10)]
    with pytest.raises(UsageError, match=r"v\[0\] must be a contiguous torch.bfloat16 tensor"):
        grad_update_(p, p, rule=Rule.ADAM, hyper=Hyper.make(0.1), m=[torch.zeros(10, dtype=torch.bfloat16)],
                     v=[torch.zeros(10)])
    with pytest.raises(UsageError, match=r"m\[0\] must be a contiguous torch.float32 tensor"):
        grad_update_(p, p, rule=Rule.SGD, hyper=Hyper.make(0.1), m=[torch.zeros(10, dtype=torch.float16)])


def test_shared_state_needs_one_state_dtype():
    """Refused when the hybrid is built; and should the groups change later, before the step writes."""
    params, closure = problem(2)
    with pytest.raises(UsageError, match="cannot share their state: their state_dtype differs"):
        optim.HybridFOZO(params, lr=1e-2, zo_lr=1e-3, block=1, shared_state=True,
                         fo_optimizer=lambda g: optim.AdamW(g, state_dtype="bfloat16"),
                         zo_optimizer=lambda g: optim.ZOAdam(g, seed=1))
    hybrid = optim.HybridFOZO(params, lr=1e-2, zo_lr=1e-3, block=1, shared_state=True,
                              fo_optimizer=lambda g: optim.AdamW(g, state_dtype="bfloat16"),
                              zo_optimizer=lambda g: optim.ZOAdam(g, seed=1, state_dtype="bfloat16"))
    hybrid.step(closure)  # first-order: bfloat16 state
    for group in hybrid.zo.param_groups:
        group["state_dtype"] = "float32"
    before = [p.detach().clone() for p in params]
    with pytest.raises(UsageError, match="give every optimizer that keeps this state the same state_dtype"):
        hybrid.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_registry_and_command_line_take_state_dtype():
    options = key_values(["state_dtype=bfloat16"], "--optimizer-option")
    for name in ("adamw", "sgd", "signadam", "zo_adam", "adazo"):
        check_optimizer_options(name, options)
    opt = make_optimizer("adamw", [torch.nn.Parameter(torch.zeros(3))], **options)
    assert isinstance(opt, optim.AdamW) and opt.param_groups[0]["state_dtype"] == "bfloat16"
    check_optimizer_options("hybrid", {"fo_state_dtype": "bfloat16", "zo_state_dtype": "bfloat16"})
    with pytest.raises(UsageError, match="state_dtype must be one of"):
        check_optimizer_options("adamw", {"state_dtype": "int4"})
