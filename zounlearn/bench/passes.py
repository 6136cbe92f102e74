"""The bandwidth of one pass of each fused op over a tensor list, against torch's `add_` and
`copy_` on the same tensors (the memory ceiling: the same bytes with no arithmetic).

GB/s counts the bytes a pass must move (benchmarks/README.md, docs/gpu-check.md): theta read and
written (2s for an s-byte dtype), the gradient read (s), float32 m and v read and written (8 each)
or only read (4) as the rule needs them. x add_ / x copy_ are the pass's GB/s over theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import calls
from .calls import RULES, Rule
from .models import Shape, make_params
from .timing import Timing, time_call

SEED, MU = 1234, 1e-3
# The rules' scalars for every update pass: a tiny lr keeps the parameters where they are.
SCALARS = dict(lr=1e-7, weight_decay=0.01, beta1=0.9, beta2=0.999, eps=1e-8, step=10, bits=4, rho=0.04)
# Bytes of float32 state per element each rule moves: (m, v); 8 = read and written, 4 = read only.
STATE_BYTES = {rule: (4 * (info.reads_m + info.writes_m), 4 * (info.reads_v + info.writes_v))
               for rule, info in RULES.items()}


@dataclass
class Tensors:
    """A parameter list and what the passes need beside it: gradients, float32 m and v, scales.

    The parameters (and the gradients) are views of one flat buffer each, 512-byte aligned, so
    that the baselines run over exactly the same bytes as one tensor: the hardware's ceiling,
    with no per-tensor cost (which a multi-tensor op must not have either).
    """

    flat: torch.Tensor
    flat_grads: torch.Tensor
    params: list[torch.nn.Parameter]
    grads: list[torch.Tensor]
    m: list[torch.Tensor]
    v: list[torch.Tensor]
    scales: torch.Tensor
    offsets: list[int]

    @classmethod
    def allocate(cls, shapes: Sequence[Shape], dtype: torch.dtype, device: torch.device | str, *,
                 state: bool = True) -> Tensors:
        """state=False: no m and v (enough for the perturbation passes and the baselines)."""
        align = 512 // torch.empty((), dtype=dtype).element_size()
        starts, total = [], 0
        for shape in shapes:
            starts.append(total)
            total += -(-torch.Size(shape).numel() // align) * align
        flat, flat_grads = (make_params([(total,)], dtype, device, seed=seed)[0].detach() for seed in (0, 1))

        def views(buffer: torch.Tensor) -> list[torch.Tensor]:
            return [buffer[o : o + torch.Size(s).numel()].view(s) for o, s in zip(starts, shapes)]

        params = [torch.nn.Parameter(t) for t in views(flat)]  # trainable: the ZO-SGD step takes them too
        m = [torch.zeros_like(p, dtype=torch.float32) for p in params] if state else []
        v = [torch.full_like(p, 1e-4, dtype=torch.float32) for p in params] if state else []
        return cls(flat, flat_grads, params, views(flat_grads), m, v, torch.ones(len(params), device=device),
                   calls.flat_offsets(params))

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


@dataclass(frozen=True)
class Pass:
    """One pass over the tensors: a fused op (with its dist or rule) or a torch baseline."""

    op: str  # "add_", "copy_", "perturb_", "zo_update_" or "grad_update_"
    dist: str = "rademacher"
    rule: Rule | None = None

    @property
    def name(self) -> str:
        if self.op in ("add_", "copy_"):
            return f"torch {self.op}"
        if self.op == "perturb_":
            return f"perturb_ {self.dist}"
        return f"{self.op} {self.rule.name}" + (f" {self.dist}" if self.op == "zo_update_" else "")

    @property
    def baseline(self) -> bool:
        return self.op in ("add_", "copy_")

    def bytes_per_element(self, element_size: int) -> int:
        """What the pass must move per parameter (the baselines: over the flat buffer, padding included)."""
        if self.op in ("add_", "copy_", "perturb_"):
            return 2 * element_size
        m, v = STATE_BYTES[self.rule]
        if self.op == "zo_update_":
            return 2 * element_size + m + v
        # x s: theta read and written (2) and the gradient read (1); the moments pass reads only the
        # gradient, the quantized pass needs no gradient.
        theta = {Rule.ADAM_MOMENTS: 1, Rule.QUANTIZED: 2}.get(self.rule, 3)
        return theta * element_size + m + v

    def runner(self, t: Tensors) -> Callable[[], None]:
        """The pass as a call; run it inside calls.use(backend)."""
        if self.op == "add_":
            return lambda: t.flat.add_(1e-3)
        if self.op == "copy_":
            return lambda: t.flat_grads.copy_(t.flat)  # the gradients are scratch here
        if self.op == "perturb_":
            return lambda: calls.perturb_(t.params, [MU], SEED, offsets=t.offsets, dist=self.dist)
        m = t.m if self.rule.uses_m else []
        v = t.v if self.rule.uses_v else []
        if self.op == "zo_update_":
            return lambda: calls.zo_update_(t.params, [0.5], SEED, [0], t.offsets, rule=self.rule, m=m, v=v,
                                            restore=MU, dist=self.dist, **SCALARS)
        scales = t.scales if self.rule in (Rule.ADAM_MOMENTS, Rule.QUANTIZED) else None
        return lambda: calls.grad_update_(t.params, t.grads, rule=self.rule, m=m, v=v, scales=scales, **SCALARS)


BASELINES = (Pass("add_"), Pass("copy_"))


def fused_passes(dists: Sequence[str] = ("rademacher", "gaussian"),
                 zo_dists: Sequence[str] = ("rademacher",)) -> list[Pass]:
    """A perturbation pass per dist and one update pass of each kind: every ZO rule per zo_dist,
    every gradient rule."""
    return ([Pass("perturb_", dist) for dist in dists]
            + [Pass("zo_update_", dist, rule) for dist in zo_dists for rule in calls.ZO_RULES]
            + [Pass("grad_update_", rule=rule) for rule in calls.GRAD_RULES])


def row(p: Pass, backend: str, timing: Timing, tensors: Tensors, label: str = "") -> dict:
    """One measurement as a row (add_ratios fills x add_ and x copy_ in once the baselines are in)."""
    size = tensors.params[0].element_size()
    elements = tensors.flat.numel() if p.baseline else tensors.numel
    return dict(case=label, dtype=str(tensors.params[0].dtype)[6:], numel=tensors.numel, tensors=len(tensors.params),
                backend="torch" if p.baseline else backend, kind=p.name, ms=timing.median * 1e3,
                spread=timing.spread, rounds=len(timing.seconds), bytes_per_element=p.bytes_per_element(size),
                gbps=p.bytes_per_element(size) * elements / timing.median / 1e9)


def add_ratios(rows: Sequence[dict]) -> None:
    """x_add and x_copy: each row's GB/s over the torch add_ / copy_ row of its case (None without one)."""
    for key, name in (("x_add", BASELINES[0].name), ("x_copy", BASELINES[1].name)):
        ceiling = {r["case"]: r["gbps"] for r in rows if r["kind"] == name}
        for r in rows:
            r[key] = r["gbps"] / ceiling[r["case"]] if r["case"] in ceiling else None


@torch.no_grad()
def measure(tensors: Tensors, passes: Sequence[Pass], backends: Sequence[str], *, rounds: int = 5,
            warmup: int = 1, max_seconds: float | None = None, label: str = "",
            errors: list | None = None) -> list[dict]:
    """One row per (backend, pass) plus the baselines, each with ms, GB/s, x add_ and x copy_.

    errors: a list to record a pass that raises in (and go on with the others); else it raises."""
    device = tensors.params[0].device
    rows = []
    for backend, todo in [("torch", BASELINES)] + [(b, passes) for b in backends]:
        with calls.use(None if backend == "torch" else backend):
            for p in todo:
                try:
                    timing = time_call(p.runner(tensors), device, rounds=rounds, warmup=warmup,
                                       max_seconds=max_seconds)
                except Exception as err:
                    if errors is None:
                        raise
                    errors.append(dict(case=label, backend=backend, kind=p.name, error=f"{type(err).__name__}: {err}"))
                    continue
                rows.append(row(p, backend, timing, tensors, label))
    add_ratios(rows)
    return rows


def bytes_per_param(dtype: torch.dtype) -> int:
    """Memory Tensors.allocate takes per parameter: it and its gradient in dtype, float32 m and v."""
    return 2 * torch.empty((), dtype=dtype).element_size() + 8
