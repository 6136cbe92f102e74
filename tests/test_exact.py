"""The exact zeroth-order mode (zounlearn/optim/exact.py): theta is never written during the queries,
so a step at lr = 0 leaves every parameter bit-identical in every dtype; its projected gradients
are the in-place path's; tied weights and reads outside a parameter's own module see the same
perturbation; a closure that bypasses the model is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DEVICE, DTYPES

from zounlearn import optim
from zounlearn.errors import UsageError


class TinyLM(torch.nn.Module):
    """An embedding tied to the output projection (as GPT-2's wte and lm_head), a block, and a
    parent forward that reads a child's weight itself (F.linear on self.head.weight)."""

    def __init__(self, vocab: int = 11, width: int = 8) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.block = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.LayerNorm(width))
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(self.block(self.embed(tokens)), self.head.weight)


def make(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[TinyLM, callable]:
    torch.manual_seed(seed)
    model = TinyLM().to(dtype).to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 11, (4, 6), generator=gen).to(DEVICE)
    labels = torch.randint(0, 11, (4, 6), generator=gen).to(DEVICE)
    return model, lambda: F.cross_entropy(model(tokens).float().reshape(-1, 11), labels.reshape(-1))


def snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _lr_zero_steps(dtype, cls, queries, estimator, steps):
    model, loss = make(dtype)
    before = snapshot(model)
    opt = cls(model.parameters(), lr=0.0, mu=1e-2, queries=queries, estimator=estimator, model=model,
              perturbation="exact")
    for _ in range(steps):
        opt.step(loss)
    assert opt.draws == steps * queries and opt.last_projected_grads  # the steps ran and measured something
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a.detach().view(torch.int16 if a.dtype != torch.float32 else torch.int32),
                           b.view(torch.int16 if b.dtype != torch.float32 else torch.int32))


LR_ZERO_CASES = [(optim.ZOSGD, 1, "central"), (optim.AdaZO, 3, "central"), (optim.ZOSGD, 2, "forward")]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls, queries, estimator", LR_ZERO_CASES)
def test_lr_zero_leaves_every_parameter_bit_identical(backend, dtype, cls, queries, estimator):
    """50 steps (5 in Triton's interpreter, which runs about 60 times slower; the slow test runs 50)."""
    _lr_zero_steps(dtype, cls, queries, estimator, 5 if backend == "triton" else 50)


@pytest.mark.slow
@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls, queries, estimator", LR_ZERO_CASES)
def test_lr_zero_bit_identical_over_50_triton_steps(backend, dtype, cls, queries, estimator):
    _lr_zero_steps(dtype, cls, queries, estimator, 50)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_in_place_path_drifts_where_the_exact_mode_does_not(dtype):
    """The check above can fail: in place, the +mu / -2 mu / +mu passes round the weights away."""
    model, loss = make(dtype)
    before = snapshot(model)
    opt = optim.ZOSGD(model.parameters(), lr=0.0, mu=1e-2, perturbation="in_place")
    for _ in range(50):
        opt.step(loss)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_auto_picks_exact_for_half_precision_only():
    half, _ = make(torch.bfloat16)
    full, _ = make(torch.float32)
    assert optim.AdaZO(half.parameters(), model=half).exact
    assert not optim.AdaZO(full.parameters(), model=full).exact
    assert not optim.AdaZO(half.parameters()).exact  # without a model: in place


@pytest.mark.parametrize("dist", ["rademacher", "gaussian", "sphere"])
def test_exact_projected_gradients_are_the_in_place_ones(dist):
    """float32, tied weights and a parent reading its child's weight: the same directional
    derivatives as the in-place path to its rounding, over several steps and queries."""
    grads = {}
    for mode in ("in_place", "exact"):
        model, loss = make(torch.float32)
        opt = optim.ZOSGD(model.parameters(), lr=1e-2, mu=1e-2, queries=2, dist=dist, seed=4, model=model,
                          perturbation=mode)
        grads[mode] = []
        for _ in range(5):
            opt.step(loss)
            grads[mode] += opt.last_projected_grads
    assert grads["exact"] == pytest.approx(grads["in_place"], rel=2e-3, abs=2e-4)


def test_tied_weight_sees_one_perturbation():
    """The embedding and the head read the same tensor, theta + mu z at one offset: so the loss at the
    perturbed point equals the loss of a model whose tied weight was moved there in place."""
    model, loss = make(torch.float32)
    opt = optim.ZOSGD(model.parameters(), lr=0.0, mu=1e-2, seed=2, model=model, perturbation="exact")
    opt.step(loss)
    twin, twin_loss = make(torch.float32)
    opt2 = optim.ZOSGD(twin.parameters(), lr=0.0, mu=1e-2, seed=2, perturbation="in_place")
    opt2.step(twin_loss)
    assert opt.last_loss == pytest.approx(opt2.last_loss, rel=1e-6)
    assert len(list(model.parameters())) == len(set(map(id, model.parameters())))  # tied: counted once


def test_closure_that_reads_parameters_directly_is_refused():
    model, loss = make(torch.bfloat16)
    params = list(model.parameters())
    before = snapshot(model)
    opt = optim.ZOSGD(params, lr=1e-3, model=model, perturbation="exact")
    with pytest.raises(UsageError, match="reads a parameter directly"):
        opt.step(lambda: loss() + sum(p.float().sum() for p in params) * 0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())  # the slots are put back


def test_closure_errors_and_in_place_changes_put_everything_back():
    model, loss = make(torch.float32)
    before = snapshot(model)
    opt = optim.AdaZO(model.parameters(), lr=1e-3, model=model, perturbation="exact")

    def writes():
        model.block[0].weight.add_(1.0)
        return loss()

    with pytest.raises(UsageError, match="in place"):
        opt.step(writes)

    def fails():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        opt.step(fails)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert all(type(p) is torch.nn.Parameter for _, p in model.named_parameters())
    assert opt.draws == 0


def test_bad_options_fail_before_any_write():
    model, _ = make(torch.bfloat16)
    before = snapshot(model)
    with pytest.raises(UsageError, match="needs the model"):
        optim.ZOSGD(model.parameters(), perturbation="exact")
    with pytest.raises(UsageError, match="perturbation must be one of"):
        optim.ZOSGD(model.parameters(), perturbation="lazy", model=model)
    stranger = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(UsageError, match="not parameters of the model's modules"):
        optim.ZOSGD([*model.parameters(), stranger], model=model)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_hybrid_zeroth_order_phase_is_exact_for_half_precision():
    model, loss = make(torch.bfloat16)
    before = snapshot(model)
    opt = optim.HybridFOZO(model.parameters(), lr=0.0, zo_lr=0.0, block=1, total_steps=6, model=model)
    assert opt.zo.exact
    for _ in range(6):
        opt.step(loss)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
