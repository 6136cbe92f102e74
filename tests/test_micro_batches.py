"""Micro-batches (gradient_accumulation_steps, issue 15): for every objective the shares of k
micro-batches sum to the one-batch loss; the counts reproduce the means as they were computed
before, bit for bit; a k = 1 run is the loop as it was, bit for bit; a run with k = 2 or 4 ends
at the parameters of the one-batch run up to rounding, first- and zeroth-order; bad values and
a resume with another k are refused before anything is written; a resume with k = 2 is bit-identical.

On a tiny GPT-2 and the synthetic data of tiny.py, one thread (CPU results depend on it)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny import DATA, nudge, tiny_gpt2, tokenizer

from zounlearn.optim import step as take_step
from zounlearn.optim.registry import make_optimizer
from zounlearn.unlearning import loop as loop_module
from zounlearn.unlearning.batches import Batches, answer_log_likelihoods, evaluating, fit_to_context
from zounlearn.unlearning.loop import LoopConfig, trainable, unlearn
from zounlearn.unlearning.objectives import Counts, StepCounts, cross_entropy, layer_output, make_objective

# Each objective with hyperparameters under which every term counts and none cancels another.
OBJECTIVES = {
    "ga": ("ga", {}),
    "graddiff": ("graddiff", {"retain_weight": 2.0}),
    "graddiff-kl": ("graddiff", {"retain_loss": "kl"}),
    "npo": ("npo", {}),
    "npo-kl": ("npo", {"retain_loss": "kl"}),
    "simnpo": ("simnpo", {"beta": 0.5}),
    "rmu": ("rmu", {"layer": 1, "update_layers": [0, 1]}),
    "rmu-open-unlearning": ("rmu", {"layer": 1, "update_layers": [0, 1], "form": "open-unlearning"}),
    "finetune": ("finetune", {}),
    "npo-weight-dist-reg": ("npo", {"weight_dist_reg": 1.0}),
}
# float32 (eps 1.2e-7): a share differs from its rows' part of the whole only by the rounding of its sums, and
# summing <= 6 shares adds a few more roundings, on losses of order 1 to 50 (measured: at most 1.7e-7 relative).
SHARE_RTOL = 1e-6


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _prepared(name: str):
    model = tiny_gpt2()
    forget = Batches(DATA.forget.train, tokenizer(), 6, seed=0)
    retain = Batches(DATA.retain.qa[:12], tokenizer(), 6, seed=0)
    objective = make_objective(OBJECTIVES[name][0], **OBJECTIVES[name][1])
    objective.prepare(model, forget, retain)
    nudge(model)  # away from the references, so that NPO's and the KL's terms are not at their starting values
    return model, objective, forget.batch(0), retain.batch(0)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_shares_of_k_micro_batches_sum_to_the_one_batch_loss(name):
    model, objective, fb, rb = _prepared(name)
    counts = StepCounts.of(fb, rb)
    with torch.no_grad():
        whole = objective(model, fb, rb)
        (f1,), (r1,) = fb.split(1), rb.split(1)
        assert torch.equal(objective(model, f1, r1, counts), whole)  # k = 1: the same computation
        for k in (2, 3, 6):
            shares = [objective(model, f, r, counts) for f, r in zip(fb.split(k), rb.split(k))]
            assert len(shares) == k and all(len(f) == 6 // k for f in fb.split(k))
            torch.testing.assert_close(sum(shares), whole, rtol=SHARE_RTOL, atol=0.0)


def test_split_keeps_the_rows_and_the_width():
    batch = Batches(DATA.forget.train, tokenizer(), 5, seed=0).batch(0)
    parts = batch.split(2)
    assert [len(p) for p in parts] == [3, 2] and len(batch.split(9)) == 5  # never an empty micro-batch
    for field in ("input_ids", "attention_mask", "labels", "indices"):
        assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(batch, field))
    assert all(p.input_ids.shape[1] == batch.input_ids.shape[1] for p in parts)


def test_counts_reproduce_the_means_as_they_were_bit_for_bit():
    """The formulas before micro-batches (mean(), batchmean, n_tokens.sum()) against the counts' divisions."""
    model, npo, fb, rb = _prepared("npo-kl")
    with torch.no_grad():
        assert torch.equal(cross_entropy(model, fb, Counts.of(fb).tokens), cross_entropy(model, fb))
        log_likelihood, n_tokens = answer_log_likelihoods(model, fb)
        was = -(2 / npo.beta) * F.logsigmoid(-npo.beta * (log_likelihood - npo.reference[fb.indices])).mean()
        assert torch.equal(npo.forget_loss(model, fb, Counts.of(fb)), was)
        simnpo = make_objective("simnpo", beta=0.5)
        was = -(2 / 0.5) * F.logsigmoid(0.5 * (-log_likelihood / n_tokens - simnpo.delta)).mean()
        assert torch.equal(simnpo.forget_loss(model, fb, Counts.of(fb)), was)
        current = model(input_ids=rb.input_ids, attention_mask=rb.attention_mask).logits.float().log_softmax(-1)
        original = npo.kl.cache.take(rb, "test")
        was = F.kl_div(current.flatten(0, 1), original.flatten(0, 1), reduction="batchmean", log_target=True)
        assert torch.equal(npo.kl(model, rb, Counts.of(rb).positions), was)
        rmu = make_objective("rmu", layer=1)
        hidden = layer_output(model, fb, 1)
        target = rmu.steering_coeff * rmu.direction(hidden.shape[-1])
        was = F.mse_loss(hidden, target.expand_as(hidden))  # WMDP's
        assert torch.equal(rmu.distance(hidden, target, fb, Counts.of(fb)), was)


RUN = {"steps": 4, "batch_size": 4, "eval_batch_size": 64}
OPTIMIZERS = {  # name: (optimizer, lr, options)
    "sgd": ("sgd", 0.1, {}),
    "sgd-in-backward": ("sgd", 0.1, {"in_backward": True}),
    "adamw": ("adamw", 1e-3, {}),
    "zo_sgd": ("zo_sgd", 1e-3, {}),
    "adazo": ("adazo", 1e-3, {}),
    "hybrid": ("hybrid", 0.1, {"block": 2, "zo_lr": 1e-3, "fo_optimizer": "sgd"}),
    "hybrid-in-backward": ("hybrid", 0.1, {"block": 2, "zo_lr": 1e-3, "fo_optimizer": "sgd", "fo_in_backward": True}),
    "custom": ("custom", None, {}),
}


def _run(name: str, k: int, run_dir=None, resume: bool = False, **loop) -> torch.nn.Module:
    optimizer, lr, options = OPTIMIZERS[name]
    config = LoopConfig(optimizer=optimizer, lr=lr, optimizer_options=options, gradient_accumulation_steps=k,
                        **{**RUN, **loop})
    model = tiny_gpt2()
    factory = (lambda ps: torch.optim.SGD(ps, lr=0.1)) if optimizer == "custom" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny model's context truncates nothing, but say so quietly
        unlearn(model, tokenizer(), DATA, config, run_dir, resume=resume, progress=False, optimizer_factory=factory)
    return model


def _by_hand(name: str) -> torch.nn.Module:
    """The loop as it was before micro-batches: one closure over the step's batches, `take_step`."""
    optimizer_name, lr, options = OPTIMIZERS[name]
    model, config = tiny_gpt2(), LoopConfig(**RUN)
    objective = config.objective_instance()
    limit = fit_to_context(model, tokenizer(), [DATA], None, warn=False)
    forget = Batches(trainable(DATA.forget), tokenizer(), 4, seed=0, max_length=limit)
    retain = Batches(trainable(DATA.retain), tokenizer(), 4, seed=1, max_length=limit)
    objective.prepare(model, forget, retain)
    params = objective.parameters(model)
    optimizer = torch.optim.SGD(params, lr=0.1) if optimizer_name == "custom" else \
        make_optimizer(optimizer_name, params, lr=lr, seed=0, total_steps=RUN["steps"], model=model, **options)
    with torch.random.fork_rng(), evaluating(model):
        torch.manual_seed(0)
        for step in range(RUN["steps"]):
            f, r = forget.batch(step), retain.batch(step)
            take_step(optimizer, lambda f=f, r=r: objective(model, f, r))
    return model


def _largest_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name", ["sgd-in-backward", "adamw", "adazo", "hybrid", "custom"])
def test_one_micro_batch_is_the_loop_as_it_was_bit_for_bit(name):
    assert _largest_difference(_run(name, 1), _by_hand(name)) == 0.0


# First-order: the gradient is a sum of the micro-batches' gradients instead of one backward, float32 rounding
# of parameters of order 1 moved by order 1 (measured: 1.8e-7). Zeroth-order: the same directions, and the
# projected gradient (L+ - L-) / 2 mu divides the loss's rounding (eps |L|, L ~ 20) by 2 mu = 2e-3: relative to
# how far the run moved the parameters, measured 2e-5; other directions would differ by the whole movement.
# Adam and the sign methods are left out: m / sqrt(v) and sign(g) turn a rounding-sized difference in a
# near-zero gradient into a step of lr (measured 2e-5 after 4 AdamW steps of 1e-3).
FIRST_ORDER_ATOL, ZEROTH_ORDER_RELATIVE = 1e-6, 1e-3


@pytest.mark.parametrize("name, k", [("sgd", 2), ("sgd", 4), ("sgd-in-backward", 2), ("custom", 2), ("zo_sgd", 2),
                                     ("adazo", 4), ("hybrid", 2), ("hybrid-in-backward", 4)])
def test_k_micro_batches_end_where_the_one_batch_run_does(name, k):
    one, micro = _run(name, 1), _run(name, k)
    moved = _largest_difference(one, tiny_gpt2())
    difference = _largest_difference(one, micro)
    assert moved > 1e-2
    if name.startswith(("zo_", "adazo", "hybrid")):
        assert difference <= ZEROTH_ORDER_RELATIVE * moved, (difference, moved)
    else:
        assert difference <= FIRST_ORDER_ATOL, difference


def test_sophia_takes_its_hessian_from_the_last_micro_batch():
    """It runs and moves the weights; its estimate sees the last micro-batch's forget rows, so no equality."""
    OPTIMIZERS["sophia"] = ("sophia", 1e-3, {})
    try:
        model = _run("sophia", 2)
    finally:
        del OPTIMIZERS["sophia"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert _largest_difference(model, tiny_gpt2()) > 0


@pytest.mark.parametrize("value, message", [(0, "must be an integer >= 1"), (2.0, "must be an integer"),
                                            (True, "must be an integer"),
                                            (5, "is more than batch_size 4: a micro-batch would have no example")])
def test_bad_values_are_refused(value, message):
    with pytest.raises(ValueError, match=message):
        LoopConfig(batch_size=4, gradient_accumulation_steps=value)
    with pytest.raises(ValueError, match="more than retain_batch_size 2"):
        LoopConfig(batch_size=4, retain_batch_size=2, gradient_accumulation_steps=3)


def test_resume_with_another_k_is_refused(tmp_path):
    run = tmp_path / "run"
    _run("sgd", 2, run, checkpoint_every=2)
    (run / "report.json").unlink()  # an unfinished run, as an interrupted one is
    with pytest.raises(ValueError, match="differs in loop"):
        _run("sgd", 1, run, checkpoint_every=2, resume=True)


def test_resume_with_micro_batches_is_bit_identical(tmp_path, monkeypatch):
    straight = _run("hybrid-in-backward", 2, tmp_path / "straight", checkpoint_every=2, steps=6)
    real_step, calls = loop_module._step, []

    def crashing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return real_step(*args)

    monkeypatch.setattr(loop_module, "_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run("hybrid-in-backward", 2, tmp_path / "resumed", checkpoint_every=2, steps=6)
    monkeypatch.undo()
    resumed = _run("hybrid-in-backward", 2, tmp_path / "resumed", resume=True, checkpoint_every=2, steps=6)
    assert _largest_difference(resumed, straight) == 0.0
