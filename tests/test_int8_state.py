"""8-bit block-wise optimizer state (state_dtype="int8", zounlearn/optim/quantized_state.py).

The quantizer against bitsandbytes bit for bit; the optimizers against their float32 twins
within the bound the quantization error implies; the bytes they hold; small tensors kept
float32; the state-dict round trip; the errors."""

from __future__ import annotations

import io
import math

import pytest
import torch
from seeds import fresh_seed

from zounlearn import optim
from zounlearn.errors import UsageError
from zounlearn.optim import quantized_state as q8
from zounlearn.optim.registry import check_optimizer_options, make_optimizer

bnb = pytest.importorskip("bitsandbytes.functional")

# (name, class, options, the states linear in their gradient sequence with their beta: the ones
# the float32-twin bound holds for; AdaZO's v tracks m^2, so only its m is).
INT8 = [
    ("AdamW", optim.AdamW, {"betas": (0.9, 0.99)}, {"exp_avg": 0.9, "exp_avg_sq": 0.99}),
    ("SignAdam", optim.SignAdam, {"beta": 0.8}, {"exp_avg": 0.8}),
    ("ZOAdam", optim.ZOAdam, {"betas": (0.9, 0.99), "mu": 1e-2, "seed": 3}, {"exp_avg": 0.9, "exp_avg_sq": 0.99}),
    ("AdaZO", optim.AdaZO, {"betas": (0.9, 0.99), "mu": 1e-2, "seed": 3}, {"exp_avg": 0.9}),
    ("ZOSignAdam", optim.ZOSignAdam, {"beta": 0.8, "mu": 1e-2, "seed": 3}, {"exp_avg": 0.8}),
]
SIZES = [(67, 75), (4096,), (129,), (3, 1500)]  # two quantized (one with a short last block), two kept float32
QUANTIZED = [math.prod(s) >= q8.MIN_8BIT_SIZE for s in SIZES]
SIGNED = {"exp_avg": True, "exp_avg_sq": False}  # m on the signed map, v (>= 0) on the unsigned one



def spread(n: int, gen: torch.Generator) -> torch.Tensor:
    """Gaussian values over 12 decades: every part of the dynamic map gets used."""
    return torch.randn(n, generator=gen) * 10.0 ** torch.randint(-9, 3, (n,), generator=gen).float()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes(signed):
    ours = q8.dynamic_map(signed)
    assert ours.shape == (256,) and bool((ours.diff() > 0).all())
    assert torch.equal(bits(ours), bits(bnb.create_dynamic_map(signed=signed)))


@pytest.mark.parametrize("n", [1, 255, 256, 257, 4095, 10007, 70001])
@pytest.mark.parametrize("signed", [True, False])
def test_quantizer_is_bitsandbytes_bit_for_bit(n, signed, monkeypatch):
    """Codes, absmax and dequantized values equal bitsandbytes', on odd sizes, values over 12
    decades, an all-zero block and a block whose absmax is negative; 1024-element pieces of work,
    so the larger sizes cross many piece boundaries. The oracle is bitsandbytes' nearest-code CPU
    path (what its quantize_blockwise op does for a float64 tensor); its float32 CPU kernel's
    search is not nearest far below the absmax (see below)."""
    monkeypatch.setattr(q8, "_CHUNK", 1024)
    gen = torch.Generator().manual_seed(n + signed)
    x = spread(n, gen)
    x = x if signed else x.abs()
    if n > 600:
        x[256:512] = 0.0
        x[512:768] = x[512:768].abs().neg() if signed else x[512:768]
        x[520] = -1e3 if signed else 1e3
    code = q8.dynamic_map(signed)
    codes, absmax = torch.empty(n, dtype=torch.uint8), torch.empty(q8.blocks(n))
    q8.quantize_(x, signed, codes, absmax)
    want_codes, want_absmax = torch.ops.bitsandbytes.quantize_blockwise(x.double(), code, q8.BLOCK)
    assert torch.equal(codes, want_codes)
    assert torch.equal(bits(absmax), bits(want_absmax))
    state = bnb.QuantState(absmax=absmax, code=code, blocksize=q8.BLOCK, dtype=torch.float32)
    assert torch.equal(bits(q8.dequantize(codes, absmax, signed)), bits(bnb.dequantize_blockwise(codes, state)))


def test_bitsandbytes_float32_cpu_kernel_is_not_nearest():
    """Why the float32 kernel is not the oracle: 4e-9 of the absmax gets the code of 2.1e-5 there,
    while the nearest map value is 0 (ours, and bitsandbytes' nearest-code path)."""
    x = torch.tensor([1.0, 4e-9])
    code = q8.dynamic_map(True)
    kernel, _ = bnb.quantize_blockwise(x, code=code, blocksize=q8.BLOCK)
    codes, absmax = torch.empty(2, dtype=torch.uint8), torch.empty(1)
    q8.quantize_(x, True, codes, absmax)
    assert float(code[int(codes[1])]) == 0.0 and float(code[int(kernel[1])]) > 1e-5


def problem(seed: int):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 2) for s in SIZES]
    targets = [torch.randn(s, generator=gen) for s in SIZES]
    return params, lambda: sum(((p - t) ** 2).sum() for p, t in zip(params, targets))


def run(cls, options, state_dtype, seed, steps, lr=0.0):
    """The optimizer, its parameters and each step's state entries (cloned)."""
    params, closure = problem(seed)
    opt = cls(params, lr=lr, state_dtype=state_dtype, **options)
    history = []
    for _ in range(steps):
        opt.step(closure)
        history.append([{k: v.clone() for k, v in opt.state[p].items() if k != "step"} for p in params])
    return opt, params, history


@pytest.mark.parametrize(("name", "cls", "options", "linear"), INT8, ids=[c[0] for c in INT8])
def test_int8_state_bytes(name, cls, options, linear):
    """1 byte per element and 4 per block of 256 for the quantized tensors, float32 for the small
    ones: would fail if the state were secretly float32 (or bfloat16)."""
    opt, params, _ = run(cls, options, "int8", 1, 2, lr=1e-3)
    keys = ["exp_avg", "exp_avg_sq"] if name in ("AdamW", "ZOAdam", "AdaZO") else ["exp_avg"]
    for p, quantized in zip(params, QUANTIZED):
        state = {k: v for k, v in opt.state[p].items() if k != "step"}
        if quantized:
            assert {k: v.dtype for k, v in state.items()} == {
                **{f"{k}_q": torch.uint8 for k in keys}, **{f"{k}_absmax": torch.float32 for k in keys}}
            n = p.numel()
            assert sum(t.nbytes for t in state.values()) == len(keys) * (n + 4 * math.ceil(n / 256))
        else:
            assert {k: v.dtype for k, v in state.items()} == {k: torch.float32 for k in keys}
            assert sum(t.nbytes for t in state.values()) == len(keys) * 4 * p.numel()


def largest_gap(signed: bool) -> float:
    return float(q8.dynamic_map(signed).diff().max())


@pytest.mark.parametrize(("name", "cls", "options", "linear"), INT8, ids=[c[0] for c in INT8])
def test_int8_state_within_its_bound_of_the_float32_twin(name, cls, options, linear):
    """At lr = 0 both runs see the same gradients (or ZO estimates), so a linear state
    m_k = b m_(k-1) + c g_k of the 8-bit run differs from its float32 twin by
    e_N = sum_k b^(N-k) d_k, d_k the error of step k's quantization of y_k (the float32 value the
    pass computed). The nearest map value is at most half the map's largest gap G away, in units
    of the block's absmax A_k = max |y_k| (the absmax stored at step k), so
    |d_k| <= (G/2) A_k, plus float32 roundings (1 / A_k, the product, the dequantization, and the
    twin's own arithmetic: a few 2^-24 A_k, allowed 2^-20 A_k):
    |e_N| <= sum_k b^(N-k) (G/2 + 2^-20) A_k, element by element. Tensors under 4096 elements keep
    float32 state: bit-identical to the twin."""
    seed, steps = fresh_seed(), 12
    _, params, history = run(cls, options, "int8", seed, steps)
    _, _, twin = run(cls, options, "float32", seed, steps)
    for key, beta in linear.items():
        slack = largest_gap(SIGNED[key]) / 2 + 2.0**-20
        used = 0.0
        for i, (p, quantized) in enumerate(zip(params, QUANTIZED)):
            want = twin[-1][i][key]
            if not quantized:
                assert torch.equal(bits(history[-1][i][key]), bits(want)), f"{key} of tensor {i} (seed {seed})"
                continue
            got = q8.dequantize(history[-1][i][f"{key}_q"], history[-1][i][f"{key}_absmax"], SIGNED[key])
            amax = torch.stack([h[i][f"{key}_absmax"] for h in history])  # (steps, blocks)
            weights = torch.tensor([beta ** (steps - 1 - k) for k in range(steps)])[:, None]
            bound = (slack * (weights * amax).sum(0)).repeat_interleave(q8.BLOCK)[:p.numel()].view(p.shape)
            err = (got - want).abs()
            assert bool((err <= bound).all()), f"{key} of tensor {i}: {float((err - bound).max())} over (seed {seed})"
            used = max(used, float((err / bound.clamp(min=1e-30)).max()))
        # ZOAdam's v is exact: g_hat^2 is one value over a Rademacher direction, each block's absmax.
        if any(bool((twin[-1][i][key] != twin[-1][i][key].reshape(-1)[0]).any()) for i in range(len(SIZES))):
            assert used > 0.05, f"{key}: the bound is far from the errors ({used}), or nothing was quantized"


@pytest.mark.parametrize("name", ["AdamW", "SignAdam", "ZOAdam"])
def test_int8_state_dict_round_trips_bit_identically(name):
    """Save after 3 steps (torch.save), load into a fresh optimizer, 3 more steps on both:
    parameters, codes, absmax and the small tensors' float32 state bit-identical."""
    _, cls, options, _ = next(c for c in INT8 if c[0] == name)
    params, closure = problem(fresh_seed())
    opt = cls(params, lr=1e-2, state_dtype="int8", **options)
    for _ in range(3):
        opt.step(closure)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = cls(copies, lr=1e-2, state_dtype="int8", **options)
    other.load_state_dict(torch.load(buffer, weights_only=False))

    def same_state():
        for p, q in zip(params, copies):
            assert opt.state[p].keys() == other.state[q].keys()
            for key, value in opt.state[p].items():
                if key != "step":
                    assert other.state[q][key].dtype == value.dtype and torch.equal(other.state[q][key], value), key

    same_state()

    def closure_of(ps):
        return lambda: sum(((p - 0.5) ** 2).sum() for p in ps)

    for _ in range(3):
        opt.step(closure_of(params))
        other.step(closure_of(copies))
    assert all(torch.equal(bits(p), bits(q)) for p, q in zip(params, copies))
    same_state()


def test_int8_state_in_backward_is_the_normal_path():
    """Updates inside backward (one tensor at a time anyway), with update_clip reading the
    dequantized m and v, keep the normal path's bits."""
    results = []
    for in_backward in (False, True):
        params, closure = problem(5)
        opt = optim.AdamW(params, lr=1e-2, state_dtype="int8")
        for group in opt.param_groups:
            group["update_clip"] = 0.5
        if in_backward:
            opt.update_in_backward()
        for _ in range(3):
            opt.step(closure)
        results.append([t.clone() for p in params for t in (p, *opt.state[p].values()) if isinstance(t, torch.Tensor)])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_bad_int8_options_are_clear_errors():
    params = [torch.nn.Parameter(torch.randn(5000))]
    for cls, options in ((optim.SGD, {"momentum": 0.9}), (optim.CompressedAdam, {}), (optim.SignSGD, {}),
                         (optim.ZOSGD, {"momentum": 0.9}), (optim.ZOSignSGD, {})):
        with pytest.raises(UsageError, match=f"{cls.__name__} takes no state_dtype='int8'"):
            cls(params, state_dtype="int8", **options)
    with pytest.raises(UsageError, match="SophiaG keeps float32 state"):
        optim.SophiaG(params, state_dtype="int8")
    # A group switched to int8 after its float32 state exists: refused before any write.
    opt = optim.AdamW(params, lr=0.1)
    params[0].grad = torch.ones(5000)
    opt.step()
    before = [params[0].detach().clone(), opt.state[params[0]]["exp_avg"].clone()]
    opt.param_groups[0]["state_dtype"] = "int8"
    with pytest.raises(UsageError, match="holds exp_avg but its group's state_dtype is 'int8', which keeps "
                                         "exp_avg_q, exp_avg_absmax"):
        opt.step()
    assert torch.equal(params[0], before[0]) and torch.equal(opt.state[params[0]]["exp_avg"], before[1])
    assert "exp_avg_q" not in opt.state[params[0]]
    # State dicts that do not fit: another state_dtype's entries, a wrong absmax, codes that are not uint8.
    opt.param_groups[0]["state_dtype"] = "float32"
    float_dict = opt.state_dict()
    fresh = optim.AdamW([torch.nn.Parameter(torch.randn(5000))], state_dtype="int8")
    with pytest.raises(UsageError, match="holds 'exp_avg' for a parameter of shape \\(5000,\\); with its group's "
                                         "state_dtype 'int8' AdamW keeps step, exp_avg_absmax"):
        float_dict["param_groups"][0]["state_dtype"] = "int8"
        fresh.load_state_dict(float_dict)
    source = optim.AdamW([torch.nn.Parameter(torch.randn(5000))], state_dtype="int8")
    source.param_groups[0]["params"][0].grad = torch.ones(5000)
    source.step()
    for key, value, match in (("exp_avg_absmax", torch.zeros(19), "has shape \\(19,\\)"),
                              ("exp_avg_q", torch.zeros(5000), "'exp_avg_q' is torch.float32 but its group's "
                                                                "state_dtype is 'int8'")):
        saved = source.state_dict()
        saved["state"][0][key] = value
        with pytest.raises(UsageError, match=match):
            fresh.load_state_dict(saved)
    assert not fresh.state


def test_shared_int8_state_needs_int8_on_both():
    params, closure = problem(2)
    with pytest.raises(UsageError, match="cannot share their state: their state_dtype differs"):
        optim.HybridFOZO(params, lr=1e-2, zo_lr=1e-3, block=1, shared_state=True,
                         fo_optimizer=lambda g: optim.AdamW(g, state_dtype="int8"),
                         zo_optimizer=lambda g: optim.ZOAdam(g, seed=1, state_dtype="bfloat16"))
    hybrid = optim.HybridFOZO(params, lr=1e-2, zo_lr=1e-3, block=1, shared_state=True,
                              fo_optimizer=lambda g: optim.AdamW(g, state_dtype="int8"),
                              zo_optimizer=lambda g: optim.ZOAdam(g, seed=1, state_dtype="int8"))
    for _ in range(2):  # first-order, then zeroth-order, on the one quantized state
        hybrid.step(closure)
    assert hybrid.fo.state[params[0]]["exp_avg_q"].dtype == torch.uint8


def test_registry_and_command_line_take_int8():
    for name in ("adamw", "signadam", "zo_adam", "adazo", "zo_signadam"):
        check_optimizer_options(name, {"state_dtype": "int8"})
    opt = make_optimizer("adamw", [torch.nn.Parameter(torch.zeros(3))], state_dtype="int8")
    assert isinstance(opt, optim.AdamW) and opt.param_groups[0]["state_dtype"] == "int8"
    check_optimizer_options("hybrid", {"fo_state_dtype": "int8", "zo_state_dtype": "int8"})
    with pytest.raises(UsageError, match="SGD takes no state_dtype='int8'"):
        check_optimizer_options("sgd", {"state_dtype": "int8"})
