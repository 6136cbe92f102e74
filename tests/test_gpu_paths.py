"""The kernels' paths the op tests never reach on a GPU (issue 14; docs/gpu-check.md), every op,
rule, dtype and backend against the pure-PyTorch reference on the same device:

- multi_tile: enough elements for several tiles per CTA (the grid-stride loop, the tile scan and
  the double-buffered shared words), sized from the GPU's SM count;
- many_tensors: more tensors than one launch holds (120 / 81 / 63 per op), empty ones among them;
- mixed_dtypes: float32, bfloat16 and float16 tensors in one call, each dtype past one launch;
- misaligned: views whose data pointers are not 16-byte aligned (the scalar fallback), params,
  gradients and state each shifted differently, next to an aligned tensor;
- side_stream: the op on a busy non-default stream (work on any other stream reads stale data);
- huge: one tensor of more than 2^31 elements at a global offset past 2^32 (windows checked).

With a GPU the backends are cuda and triton. Without one the same cases run at small scale on
the cpp backend (side_stream is CUDA-only; Triton's interpreter takes seconds per launch, and
tests/test_triton_kernels.py covers it on the CPU). Each test records its largest error, which
`make gpu-check` collects from the JUnit XML.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch

from zounlearn.bench import calls
from zounlearn.bench.calls import GRAD_RULES, ZO_RULES, Rule, flat_offsets

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
BACKENDS = [b for b in calls.runnable(DEVICE) if GPU or b != "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DISTS = ["rademacher", "gaussian"]
SEED, COEFS, STREAMS, ALPHA, RESTORE = 2026, [0.7, -0.4, 0.2], [3, 2**40 + 1, 9], 0.999, 1e-3
TILE = 4096  # elements per CUDA tile (csrc/cuda/multi_tensor.cuh)


def scalars(rule: Rule) -> dict:
    return dict(lr=0.05, weight_decay=0.1, decoupled=rule is not Rule.SGD, beta1=0.9, beta2=0.99, eps=1e-6, step=4,
                bits=3, rho=0.04)


@dataclass(frozen=True)
class Layout:
    """A tensor list: sizes, dtypes (None: the test's dtype for all, else cycled), each tensor's
    shift in elements past an aligned address (params, grads, m, v), the first global offset."""

    name: str
    sizes: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...] | None = None
    shifts: tuple[int, int, int, int] = (0, 0, 0, 0)
    base: int = 0


def _multi_tile_numel() -> int:
    if not GPU:
        return 1 << 15
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return sms * 5 * 4 * TILE  # at the most CTAs per SM any kernel has (5), 4 tiles per CTA


def _layouts() -> dict[str, Layout]:
    n = _multi_tile_numel()
    # 390 tensors on a GPU: 130 per dtype when mixed. The CPU op has no launch capacity and the
    # reference loops over tensors slowly: 36 small ones there.
    many = tuple([0, 1, 129, TILE, 5000, 3 * TILE - 1] * 65 if GPU else [0, 1, 129, 300, 17, 64] * 6)
    return {layout.name: layout for layout in (
        Layout("multi_tile", (n // 2 + 3, TILE + 1, n // 3 - 129, 1, n // 6 - 7), base=2**32 - 333),
        Layout("many_tensors", many[:300] if GPU else many[:30]),
        Layout("mixed_dtypes", many, dtypes=tuple(DTYPES)),
        Layout("misaligned", (8 * TILE + 3, 5000, 129, (40 if GPU else 2) * TILE), shifts=(1, 3, 1, 2), base=7),
        Layout("side_stream", (n // 2 + 3, TILE + 1, n // 3 - 129, 1, n // 6 - 7), base=2**32 - 333),
    )}


LAYOUTS = _layouts()


def _ops() -> list[tuple]:
    ops = [("perturb_", d, None) for d in DISTS]
    ops += [("zo_update_", d, r) for d in DISTS for r in ZO_RULES]
    return ops + [("grad_update_", None, r) for r in GRAD_RULES]


def _cases() -> list:
    cases = []
    for layout in LAYOUTS.values():
        streams = layout.name == "side_stream"
        marks = [pytest.mark.skipif(not GPU, reason="CUDA streams: no GPU here")] if streams else []
        sampled = layout.name in ("multi_tile", "side_stream")
        for dtype in (None,) if layout.dtypes else DTYPES:
            for op, dist, rule in _ops() + ([("sample", d, None) for d in DISTS] if sampled else []):
                name = None if rule is None else rule.name  # not `rule and ...`: Rule.SGD is 0
                parts = [layout.name, op, dist, name, str(dtype)[6:] if dtype else "mixed"]
                cases.append(pytest.param(layout.name, op, dist, rule, dtype, marks=marks,
                                          id="-".join(p for p in parts if p)))
    return cases


def _shifted(values: torch.Tensor, shift: int) -> torch.Tensor:
    """A copy of values whose data starts `shift` elements past the buffer's (aligned) start."""
    buffer = torch.empty(values.numel() + shift, dtype=values.dtype, device=values.device)
    out = buffer[shift:].view(values.shape)
    out.copy_(values)
    return out


@functools.lru_cache(maxsize=None)
def _masters(name: str, dtype: torch.dtype | None) -> dict[str, list[torch.Tensor]]:
    """The inputs of a layout (cached: every test copies them), drawn on the device."""
    layout = LAYOUTS[name]
    gen = torch.Generator(device=DEVICE).manual_seed(len(name))
    dtypes = [layout.dtypes[i % len(layout.dtypes)] if layout.dtypes else dtype for i in range(len(layout.sizes))]
    rand = lambda n, dt, scale=1.0: (torch.randn(n, generator=gen, device=DEVICE) * scale).to(dt)  # noqa: E731
    return {"params": [rand(n, dt) for n, dt in zip(layout.sizes, dtypes)],
            "grads": [rand(n, dt) for n, dt in zip(layout.sizes, dtypes)],
            "m": [rand(n, torch.float32, 0.3) for n in layout.sizes],
            "v": [rand(n, torch.float32, 0.3).square() for n in layout.sizes]}


def _inputs(layout: Layout, dtype: torch.dtype | None, rule: Rule | None) -> dict:
    masters = _masters(layout.name, dtype)
    out = {key: [_shifted(t, shift) for t in masters[key]] for key, shift in zip(("params", "grads", "m", "v"),
                                                                                   layout.shifts)}
    out["m"] = out["m"] if rule is not None and rule.uses_m else []
    out["v"] = out["v"] if rule is not None and rule.uses_v else []
    out["scales"] = None
    if rule is Rule.QUANTIZED:  # the scales a moments pass leaves (computed once, by the reference)
        out["scales"] = torch.empty(len(layout.sizes), device=DEVICE)
        m, v = ([t.clone() for t in masters[k]] for k in ("m", "v"))
        with calls.use("reference"):
            calls.grad_update_([t.clone() for t in masters["params"]], masters["grads"], rule=Rule.ADAM_MOMENTS,
                               m=m, v=v, scales=out["scales"], **scalars(rule))
    elif rule is Rule.ADAM_MOMENTS:
        out["scales"] = torch.full((len(layout.sizes),), 123.0, device=DEVICE)  # overwritten, not max-ed with
    return out


def _run(op: str, dist: str | None, rule: Rule | None, t: dict, offsets: list[int]) -> None:
    """One call of op on t's tensors, on the backend of the enclosing calls.use."""
    if op == "perturb_":
        calls.perturb_(t["params"], COEFS, SEED, streams=STREAMS, offsets=offsets, alpha=ALPHA, dist=dist)
    elif op == "zo_update_":
        calls.zo_update_(t["params"], COEFS, SEED, STREAMS, offsets, rule=rule, m=t["m"], v=t["v"], restore=RESTORE,
                         dist=dist, **scalars(rule))
    else:
        calls.grad_update_(t["params"], t["grads"], rule=rule, m=t["m"], v=t["v"], scales=t["scales"],
                           **scalars(rule))


def _on_busy_side_stream(fill: list[tuple[torch.Tensor, torch.Tensor]], fn) -> None:
    """fn on a non-default stream that first sleeps, then writes the inputs: an op that launched
    on another stream would run before the inputs exist."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # ~25 ms of GPU time
        for dst, src in fill:
            dst.copy_(src)
        fn()
    torch.cuda.synchronize()


def _compare(got: torch.Tensor, want: torch.Tensor, exact: bool, dtype: torch.dtype, flips: int) -> tuple[float, int]:
    """(max |error|, elements over tolerance); exact: none may differ. Otherwise (Gaussian z agree
    to ~1e-6): 1e-5 plus one unit of the dtype, except `flips` elements: a sign-based update at a
    tie, or an Adam step divided by a tiny sqrt(v), which amplifies the 1e-6."""
    err = (got.float() - want.float()).abs()
    if exact:
        bad = int((got.view(-1) != want.view(-1)).sum()) if not torch.equal(got, want) else 0
        return (float(err.max()) if err.numel() else 0.0), bad
    tol = 1e-5 + want.float().abs() * torch.finfo(dtype).eps
    over = int((err > tol).sum())
    return (float(err.max()) if err.numel() else 0.0), max(0, over - flips)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("layout", "op", "dist", "rule", "dtype"), _cases())
def test_matches_reference(backend, layout, op, dist, rule, dtype, record_property):
    for key, value in (("backend", backend), ("op", op), ("dist", dist or "-")):
        record_property(key, value)  # make gpu-check groups the largest errors by these
    layout = LAYOUTS[layout]
    exact = dist != "gaussian"
    if op == "sample":
        numel = sum(layout.sizes)
        with calls.use("reference"):
            want = calls.sample(numel, SEED, STREAMS[1], offset=layout.base, dist=dist, dtype=dtype, device=DEVICE)
        with calls.use(backend):
            if layout.name == "side_stream":
                got = torch.full_like(want, float("nan"))
                _on_busy_side_stream([], lambda: got.copy_(calls.sample(numel, SEED, STREAMS[1], offset=layout.base,
                                                                        dist=dist, dtype=dtype, device=DEVICE)))
            else:
                got = calls.sample(numel, SEED, STREAMS[1], offset=layout.base, dist=dist, dtype=dtype, device=DEVICE)
        error, bad = _compare(got, want, exact, dtype, 0)
        record_property("max_abs_error", error)
        assert bad == 0, f"{bad} elements differ from the reference (max |error| {error})"
        return
    t = _inputs(layout, dtype, rule)
    offsets = flat_offsets(t["params"], start=layout.base)
    want = {k: [x.clone() for x in t[k]] for k in ("params", "m", "v")}
    want_scales = None if t["scales"] is None else t["scales"].clone()
    with calls.use("reference"):
        _run(op, dist, rule, {**t, **want, "scales": want_scales}, offsets)
    with calls.use(backend):
        if layout.name == "side_stream":
            stale = {k: [torch.zeros_like(x) for x in t[k]] for k in ("params", "grads", "m", "v")}
            fill = [(s, x) for k in stale for s, x in zip(stale[k], t[k])]
            _on_busy_side_stream(fill, lambda: _run(op, dist, rule, {**t, **stale}, offsets))
            t.update(stale)
        else:
            _run(op, dist, rule, t, offsets)
    worst, failures = 0.0, []
    for key in ("params", "m", "v"):
        for i, (got, exp) in enumerate(zip(t[key], want[key])):
            flips = 0 if exact else 3 + got.numel() // 100_000  # a bug per tile (1 in 4096) is far more
            error, bad = _compare(got, exp, exact, got.dtype, flips)
            worst = max(worst, error)
            if bad:
                failures.append(f"{key}[{i}] ({got.numel()} {str(got.dtype)[6:]}): {bad} over tolerance, "
                                f"max |error| {error}")
    record_property("max_abs_error", worst)
    assert not failures, "; ".join(failures[:5])
    if rule is Rule.ADAM_MOMENTS:  # writes the moments and the scales only
        assert torch.equal(t["scales"], want_scales), "scales differ from the reference"
    else:
        largest = max(range(len(layout.sizes)), key=layout.sizes.__getitem__)
        assert not torch.equal(t["params"][largest], _masters(layout.name, dtype)["params"][largest]), "unchanged"


# More than 2^31 elements on the GPU (bfloat16: 4 GiB a tensor; the Adam case holds ~25 GiB);
# on the CPU the same checks at small scale (tests/test_perturb.py has the cpp op's 2^31 case, slow).
HUGE = 2**31 + 300 if GPU else 5000
HUGE_BASE = 2**32 + 17
WINDOWS = (0, min(2**31 - 200, HUGE // 2), HUGE - 500)
HUGE_CASES = [("sample", "rademacher", None), ("perturb_", "rademacher", None), ("perturb_", "gaussian", None),
              ("zo_update_", "rademacher", Rule.SIGN), ("zo_update_", "gaussian", Rule.SIGN),
              ("grad_update_", None, Rule.ADAM)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("op", "dist", "rule"), HUGE_CASES,
                         ids=[f"huge-{op}-{dist or rule.name}" + ("-" + rule.name if dist and rule else "")
                              for op, dist, rule in HUGE_CASES])
def test_more_than_2_31_elements(backend, op, dist, rule, record_property):
    """Windows at the start, across 2^31 and at the end, against the reference on the CPU."""
    for key, value in (("backend", backend), ("op", op), ("dist", dist or "-")):
        record_property(key, value)
    dtype = torch.bfloat16
    if op == "sample":
        with calls.use(backend):
            got = calls.sample(HUGE, SEED, 5, offset=HUGE_BASE, dist=dist, dtype=dtype, device=DEVICE)
        with calls.use("reference"):
            for start in WINDOWS:
                want = calls.sample(500, SEED, 5, offset=HUGE_BASE + start, dist=dist, dtype=dtype)
                assert torch.equal(got[start : start + 500].cpu(), want), start
        record_property("max_abs_error", 0.0)
        return
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    t = {"params": [torch.randn(HUGE, generator=gen, device=DEVICE, dtype=dtype)],
         "grads": [torch.randn(HUGE, generator=gen, device=DEVICE, dtype=dtype)] if op == "grad_update_" else [],
         "m": [], "v": [], "scales": None}
    if rule is not None and rule.uses_m:
        t["m"] = [torch.randn(HUGE, generator=gen, device=DEVICE).mul_(0.3)]  # in place: 8.6 GB, not twice
    if rule is not None and rule.uses_v:
        t["v"] = [torch.rand(HUGE, generator=gen, device=DEVICE)]
    windows = [{k: [x[start : start + 500].cpu() for x in t[k]] for k in ("params", "grads", "m", "v")}
               for start in WINDOWS]
    with calls.use(backend):
        _run(op, dist, rule, t, [HUGE_BASE])
    worst = 0.0
    for start, w in zip(WINDOWS, windows):
        with calls.use("reference"):
            _run(op, dist, rule, {**w, "scales": None}, [HUGE_BASE + start])
        for key in ("params", "m", "v"):
            for got, exp in zip(t[key], w[key]):
                error, bad = _compare(got[start : start + 500].cpu(), exp, dist != "gaussian", got.dtype, 0)
                worst = max(worst, error)
                assert bad == 0, f"window {start} of {key}: {bad} elements over tolerance, max |error| {error}"
    record_property("max_abs_error", worst)
