"""zounlearn's optimizers inside an unmodified transformers Trainer (zounlearn.hf): open-unlearning-style
Trainer subclasses against our own loop, exact zeroth-order gradient accumulation, bit-identical resume
from the Trainer's checkpoints, max_grad_norm, the Trainer's scheduler, create_optimizer by name,
evaluation and callbacks, SophiaG's Hessian refresh, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from tiny import DATA, SMALL_EMBEDDED, tiny_gpt2, tokenizer

from zounlearn import optim
from zounlearn.errors import UsageError
from zounlearn.hf import LoopBatches, StepAdapter, Trainer, TrainerMixin, one_batch
from zounlearn.ops import sample
from zounlearn.optim.registry import make_optimizer
from zounlearn.unlearning import embedded_model
from zounlearn.unlearning.batches import IGNORE, tokenize_examples
from zounlearn.unlearning.evaluation import evaluate
from zounlearn.unlearning.loop import LoopConfig, unlearn
from zounlearn.unlearning.objectives import make_objective
from zounlearn.unlearning.report import read_metrics


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small embedded model without dropout: the Trainer runs first-order steps in train mode,
    our loop in eval mode, and without dropout the two are the same network."""
    torch.set_num_threads(1)
    model, tok, data = embedded_model(0, config=SMALL_EMBEDDED, cache_dir=tmp_path_factory.mktemp("models"))
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model, tok, data


def _args(tmp_path, **overrides) -> transformers.TrainingArguments:
    """TrainingArguments of a run like our loop's: constant rate, no clipping, logged every step."""
    settings = dict(max_steps=8, per_device_train_batch_size=1, logging_steps=1, max_grad_norm=0.0, report_to=[],
                    lr_scheduler_type="constant", save_strategy="no", remove_unused_columns=False, use_cpu=True,
                    disable_tqdm=True, seed=0)
    return transformers.TrainingArguments(str(tmp_path), **{**settings, **overrides})


def _logged_losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ---------------------------------------------------------------------------------------
# open-unlearning's way: a Trainer subclass that overrides compute_loss


def _sequence_nll(model, inputs) -> torch.Tensor:
    """Summed answer-token negative log-likelihood of each sequence (open-unlearning's compute_batch_nll)."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), inputs["labels"][:, 1:], ignore_index=IGNORE,
                           reduction="none").sum(-1)


class GradDiff(TrainerMixin, transformers.Trainer):
    """gamma * (-CE(forget)) + alpha * CE(retain), the losses the model returns."""

    def __init__(self, *args, gamma=1.0, alpha=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.gamma, self.alpha = gamma, alpha

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget = model(**inputs["forget"])
        loss = -self.gamma * forget.loss + self.alpha * model(**inputs["retain"]).loss
        return (loss, forget) if return_outputs else loss


class NPO(GradDiff):
    """-(2/beta) mean log sigmoid(beta (NLL - NLL_ref)) on forget + alpha * CE(retain), with a frozen
    reference model, as open-unlearning's NPO computes it."""

    def __init__(self, *args, ref_model, beta=0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.ref_model, self.beta = ref_model, beta

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        current = _sequence_nll(model, inputs["forget"])
        with torch.no_grad():
            reference = _sequence_nll(self.ref_model, inputs["forget"])
        forget = -2 / self.beta * F.logsigmoid(self.beta * (current - reference)).mean()
        return self.gamma * forget + self.alpha * model(**inputs["retain"]).loss


RECIPES = {"adamw": (1e-3, {}), "adazo": (1e-3, {"mu": 1e-3}), "hybrid": (1e-3, {"zo_lr": 1e-4, "block": 3})}
STEPS = 8
# The two runs differ only in how the losses are rounded (the model's own loss and an
# open-unlearning NLL against our answer_log_likelihoods), so their per-step losses agree to
# LOSS_RTOL of max(1, |loss|) and the final models' forget and retain losses to EVAL_RTOL (measured:
# at most 2e-6 for AdamW, 2e-3 of a GradDiff loss of 0.1 for AdaZO, 1e-5 of NPO's 3 to 14).
LOSS_RTOL, EVAL_RTOL = 5e-3, 1e-3


@pytest.mark.parametrize("name", list(RECIPES))
@pytest.mark.parametrize("objective", ["graddiff", "npo"])
def test_open_unlearning_trainer_matches_our_loop(small, tmp_path, objective, name):
    model0, tok, data = small
    lr, options = RECIPES[name]
    config = LoopConfig(objective=objective, optimizer=name, lr=lr, steps=STEPS, batch_size=4, retain_batch_size=4,
                        optimizer_options=options)
    ours = copy.deepcopy(model0)
    unlearn(ours, tok, data, config, tmp_path / "loop", progress=False, save_model=False)
    loop_losses = [r["loss"] for r in read_metrics(tmp_path / "loop" / "metrics.jsonl") if r["type"] == "train"]

    theirs = copy.deepcopy(model0)
    optimizer = make_optimizer(name, make_objective(objective).parameters(theirs), lr=lr, seed=0, total_steps=STEPS,
                               **options)
    extra = {"ref_model": copy.deepcopy(model0).eval()} if objective == "npo" else {}
    trainer = (NPO if objective == "npo" else GradDiff)(
        theirs, _args(tmp_path / "trainer", max_steps=STEPS), train_dataset=LoopBatches(data, tok, 4),
        data_collator=one_batch, optimizers=(optimizer, None), **extra)
    trainer.train()

    trainer_losses = _logged_losses(trainer)
    assert len(trainer_losses) == len(loop_losses) == STEPS
    for a, b in zip(loop_losses, trainer_losses):
        assert abs(a - b) <= LOSS_RTOL * max(1.0, abs(a)), (loop_losses, trainer_losses)
    assert any(not torch.equal(a, b) for a, b in zip(ours.parameters(), model0.parameters()))
    after_loop, after_trainer = (evaluate(m, tok, data, batch_size=64) for m in (ours, theirs))
    for key in ("forget/loss", "retain/loss"):
        assert after_trainer[key] == pytest.approx(after_loop[key], rel=EVAL_RTOL), key
    if name == "hybrid":
        assert optimizer.steps == STEPS and optimizer.phase(STEPS - 1) == "zo"


# ---------------------------------------------------------------------------------------
# Gradient accumulation


class Dyadic(torch.nn.Module):
    """Least squares whose every loss and gradient is exact in float32 (few-bit dyadic weights and
    data), so that any order of summation gives the same bits."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.5, -0.25, 1.0, 0.75, 0.0, -1.0, 0.25, 0.5]))

    def forward(self, x, y):
        return (x @ self.w - y) ** 2


class DyadicTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return model(inputs["x"], inputs["y"]).mean()


class Examples(torch.utils.data.IterableDataset):
    """A fixed sequence of examples, without shuffling: a step takes the same ones however it is cut."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        while True:
            yield from self.rows


def _dyadic_rows(n=64):
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randint(-1, 2, (8,), generator=g).float(), "y": torch.randint(-3, 4, (), generator=g).float()}
            for _ in range(n)]


DYADIC = {
    "zo_sgd": lambda p: optim.ZOSGD(p, lr=0.125, mu=0.25, seed=3),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.125),
    "hybrid": lambda p: optim.HybridFOZO(p, lr=0.125, zo_lr=0.125, block=1, total_steps=2,
                                         fo_optimizer=lambda g: torch.optim.SGD(g, lr=0.125),
                                         zo_optimizer=lambda g: optim.ZOSGD(g, lr=0.125, mu=0.25, seed=3)),
}


def _dyadic_run(tmp_path, name, per_device, accumulate, steps=2):
    model = Dyadic()
    optimizer = DYADIC[name](model.parameters())
    trainer = DyadicTrainer(model, _args(tmp_path, max_steps=steps, per_device_train_batch_size=per_device,
                                         gradient_accumulation_steps=accumulate),
                            train_dataset=Examples(_dyadic_rows()), optimizers=(optimizer, None))
    trainer.train()
    return model, optimizer, _logged_losses(trainer)


@pytest.mark.parametrize("name", list(DYADIC))
def test_accumulated_micro_batches_equal_one_batch_bit_for_bit(tmp_path, name):
    """4 micro-batches of 2 and one batch of 8: the same weights, losses and (ZO) projected gradients,
    bit for bit, where every sum is exact."""
    one, one_opt, one_losses = _dyadic_run(tmp_path / "one", name, 8, 1)
    four, four_opt, four_losses = _dyadic_run(tmp_path / "four", name, 2, 4)
    assert torch.equal(one.w, four.w) and one_losses == four_losses
    assert not torch.equal(one.w, Dyadic().w)
    zo = [(a, b) for a, b in ((one_opt, four_opt), (getattr(one_opt, "zo", None), getattr(four_opt, "zo", None)))
          if isinstance(a, optim.ZeroOrderOptimizer)]
    for a, b in zo:
        assert a.last_projected_grads == b.last_projected_grads and a.draws == b.draws > 0


def test_zeroth_order_step_perturbs_once_and_differences_the_summed_losses(tmp_path):
    """One accumulated ZO step by hand: z from the optimizer's seed, the four micro-batches' mean
    losses / 4 summed at theta + mu z and at theta - mu z, their difference over 2 mu."""
    model, optimizer, losses = _dyadic_run(tmp_path, "zo_sgd", 2, 4, steps=1)
    rows = _dyadic_rows()[:8]
    w0, mu = Dyadic().w.detach(), 0.25
    z = sample(w0.shape, 3, 0)

    def summed(w):
        return sum(((torch.stack([r["x"] for r in rows[i:i + 2]]) @ w - torch.stack([r["y"] for r in rows[i:i + 2]]))
                    ** 2).mean().item() / 4 for i in range(0, 8, 2))

    plus, minus = summed(w0 + mu * z), summed(w0 - mu * z)
    assert optimizer.last_projected_grads == [(plus - minus) / 2 / mu]
    assert losses == [(plus + minus) / 2]
    assert torch.equal(model.w.detach(), w0 - 0.125 * (plus - minus) / 2 / mu * z)


def _lm_rows(examples):
    return [{"input_ids": list(t.ids), "labels": [IGNORE] * t.n_prompt + list(t.ids[t.n_prompt:])}
            for t in tokenize_examples(tokenizer(), examples)]


def _pad(items):
    width = max(len(i["input_ids"]) for i in items)
    eos = tokenizer().eos_token_id
    return {"input_ids": torch.tensor([i["input_ids"] + [eos] * (width - len(i["input_ids"])) for i in items]),
            "attention_mask": torch.tensor([[1] * len(i["input_ids"]) + [0] * (width - len(i["input_ids"]))
                                            for i in items]),
            "labels": torch.tensor([i["labels"] + [IGNORE] * (width - len(i["labels"])) for i in items])}


# The hybrid's states are bfloat16 (stochastic rounding): a sum reordered by accumulation can round
# its moments one bfloat16 step (2^-8) apart. Stepping per micro-batch would move the weights ~moved apart.
@pytest.mark.parametrize("name, bound", [("adamw", 1e-3), ("adazo", 1e-3), ("hybrid_float32", 1e-3), ("hybrid", 1e-2)])
def test_accumulation_on_a_language_model_within_rounding(tmp_path, name, bound):
    """A causal LM on token-normalised losses (num_items_in_batch): 2 micro-batches of 4 and one batch
    of 8 give the same losses and weights within the rounding of the reordered sums (and of the
    state's dtype); the hybrid's first-order phase, which updates inside backward, keeps its
    gradients under the Trainer."""
    rows = _lm_rows(DATA.forget.train + DATA.retain.train[:17])
    runs = []
    for per_device, accumulate in ((8, 1), (4, 2)):
        model = tiny_gpt2()
        opt = make_optimizer(name, model.parameters(), lr=1e-3, seed=0, total_steps=4,
                             **({"block": 1} if name.startswith("hybrid") else {}))
        trainer = Trainer(model, _args(tmp_path / str(accumulate), max_steps=4, per_device_train_batch_size=per_device,
                                       gradient_accumulation_steps=accumulate),
                          train_dataset=Examples(rows), data_collator=_pad, optimizers=(opt, None))
        trainer.train()
        runs.append((model, _logged_losses(trainer)))
    (one, one_losses), (two, two_losses) = runs
    assert one_losses == pytest.approx(two_losses, rel=1e-5)
    moved = max((a - b).abs().max().item() for a, b in zip(one.parameters(), tiny_gpt2().parameters()))
    diff = max((a - b).abs().max().item() for a, b in zip(one.parameters(), two.parameters()))
    assert diff <= bound * moved, (diff, moved)


# ---------------------------------------------------------------------------------------
# Checkpoints


RESUMABLE = {"adazo": (1e-3, {}), "hybrid": (1e-3, {"zo_lr": 1e-4, "block": 2}),
             "hybrid_float32": (1e-3, {"zo_lr": 1e-4, "block": 2}),
             "sophia": (1e-3, {"update_period": 2}), "adamw": (1e-3, {})}


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_resume_from_the_trainers_checkpoint_is_bit_identical(small, tmp_path, name):
    """6 steps of 2 micro-batches each, saved at step 3 by save_steps; resume_from_checkpoint from it in
    a new Trainer over a new model gives the same weights and optimizer state, bit for bit."""
    model0, tok, data = small
    lr, options = RESUMABLE[name]

    def run(output, resume=None):
        model = copy.deepcopy(model0)
        opt = make_optimizer(name, model.parameters(), lr=lr, seed=0, total_steps=6, **options)
        trainer = GradDiff(model, _args(output, max_steps=6, gradient_accumulation_steps=2, save_strategy="steps",
                                        save_steps=3, lr_scheduler_type="linear"),
                           train_dataset=LoopBatches(data, tok, 4), data_collator=one_batch,
                           optimizers=(opt, None))
        trainer.train(resume_from_checkpoint=resume)
        return model, opt

    straight, straight_opt = run(tmp_path / "a")
    resumed, resumed_opt = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    assert _flat(straight_opt.state_dict()) == _flat(resumed_opt.state_dict())


def _flat(value):
    """A state dict as comparable plain values (tensors as their bytes)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.cpu().flatten().view(torch.uint8).numpy().tobytes())
    if isinstance(value, dict):
        return {k: _flat(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_flat(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------
# max_grad_norm, the scheduler, create_optimizer


def test_max_grad_norm_is_refused_for_zeroth_order_and_changes_nothing(tmp_path):
    model = tiny_gpt2()
    before = copy.deepcopy(model.state_dict())
    trainer = Trainer(model, _args(tmp_path, max_grad_norm=1.0), train_dataset=Examples(_lm_rows(DATA.forget.train)),
                      data_collator=_pad, optimizers=(optim.AdaZO(model.parameters()), None))
    with pytest.raises(UsageError, match=r"max_grad_norm=1.0 clips gradients, and AdaZO takes none.*max_grad_norm=0"):
        trainer.train()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class MeanLoss(Trainer):
    """The model's own loss, the batch's token mean (without the Trainer's num_items_in_batch)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return model(**inputs).loss


def test_max_grad_norm_clips_first_order_steps_as_torch_does(tmp_path):
    """The Trainer's clipping with our fused AdamW equals clip_grad_norm_ then step() by hand, bit for bit;
    the hybrid warns that only its first-order steps are clipped."""
    rows = _lm_rows(DATA.forget.train)
    model, hand = tiny_gpt2(), tiny_gpt2()
    trainer = MeanLoss(model, _args(tmp_path, max_steps=3, max_grad_norm=0.05, per_device_train_batch_size=4),
                      train_dataset=Examples(rows), data_collator=_pad,
                      optimizers=(optim.AdamW(model.parameters(), lr=1e-2), None))
    trainer.train()
    opt = optim.AdamW(hand.parameters(), lr=1e-2)
    norms = []
    for step in range(3):
        hand(**_pad(rows[4 * step:4 * step + 4])).loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(hand.parameters(), 0.05).item())
        opt.step()
        opt.zero_grad()
    assert min(norms) > 0.05  # the clip was active
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), hand.parameters()))
    assert [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h] == pytest.approx(norms)

    hybrid = Trainer(tiny_gpt2(), _args(tmp_path / "h", max_steps=1, max_grad_norm=0.05), train_dataset=Examples(rows),
                     data_collator=_pad, optimizer_name="hybrid")
    with pytest.warns(UserWarning, match="clips HybridFOZO's first-order steps only"):
        hybrid.train()


@pytest.mark.parametrize("name", ["zo_sgd", "hybrid"])
def test_the_trainers_scheduler_drives_zeroth_order_rates(tmp_path, name):
    """lr_scheduler_type="linear": the same weights as setting each step's rate by hand (the hybrid's ZO
    phase follows in proportion), and not those of a constant rate."""
    rows = _dyadic_rows()
    make = {"zo_sgd": lambda p: optim.ZOSGD(p, lr=0.05, mu=0.01, seed=1),
            "hybrid": lambda p: optim.HybridFOZO(p, lr=0.05, zo_lr=0.02, block=1, total_steps=4,
                                                 zo_optimizer=lambda g: optim.ZOSGD(g, lr=0.02, mu=0.01, seed=1))}[name]
    model = Dyadic()
    trainer = DyadicTrainer(model, _args(tmp_path, max_steps=4, per_device_train_batch_size=8,
                                         lr_scheduler_type="linear"),
                            train_dataset=Examples(rows), optimizers=(make(model.parameters()), None))
    trainer.train()
    hand, constant = Dyadic(), Dyadic()
    opts = [make(hand.parameters()), make(constant.parameters())]
    for step in range(4):
        factor = (4 - step) / 4  # get_linear_schedule_with_warmup without warmup
        group = opts[0].param_groups[0]
        group["lr"] = 0.05 * factor
        if name == "hybrid":
            group["zo_lr"] = 0.02 * factor
        for m, o in zip((hand, constant), opts):
            batch = rows[8 * step:8 * step + 8]
            x, y = torch.stack([r["x"] for r in batch]), torch.stack([r["y"] for r in batch])
            optim.step(o, lambda m=m: m(x, y).mean())
    assert torch.equal(model.w, hand.w) and not torch.equal(model.w, constant.w)


def test_create_optimizer_builds_by_name_from_the_training_arguments(tmp_path):
    model = tiny_gpt2()
    trainer = Trainer(model, _args(tmp_path, max_steps=5, learning_rate=3e-4, weight_decay=0.1, seed=7),
                      train_dataset=Examples(_lm_rows(DATA.forget.train)), data_collator=_pad,
                      optimizer_name="adazo", optimizer_options={"mu": 1e-2, "queries": 2})
    trainer.train()
    opt = trainer.optimizer.optimizer.optimizer  # accelerate's wrapper, then ours
    assert isinstance(opt, optim.AdaZO) and opt.seed == 7 and opt.queries == 2 and opt.draws == 10
    decay = set(trainer.get_decay_parameter_names(model))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for n, p in model.named_parameters() if n in decay}
    assert all(g["lr"] == 3e-4 and g["mu"] == 1e-2 for g in opt.param_groups)

    hybrid = Trainer(tiny_gpt2(), _args(tmp_path / "h", max_steps=5), data_collator=_pad,
                     train_dataset=Examples(_lm_rows(DATA.forget.train)), optimizer_name="hybrid",
                     optimizer_options={"block": 2})
    hybrid.train()
    inner = hybrid.optimizer.optimizer.optimizer
    assert inner.total_steps == 5 and inner.last_phase == "zo"  # the schedule ends on a ZO block


def test_a_preset_by_name_updating_in_backward_trains_under_the_trainer(tmp_path):
    """The Trainer backpropagates and clips itself: the preset's first-order phase keeps its gradients
    for the step (clipped by max_grad_norm), and its param groups carry no Trainer decay groups."""
    model = tiny_gpt2()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model, _args(tmp_path, max_steps=4, max_grad_norm=1.0), data_collator=_pad,
                      train_dataset=Examples(_lm_rows(DATA.forget.train)), optimizer_name="hybrid_signadam",
                      optimizer_options={"block": 1})
    with pytest.warns(UserWarning, match="clips HybridFOZO's first-order steps only"):
        trainer.train()
    inner = trainer.optimizer.optimizer.optimizer  # accelerate's wrapper, our StepAdapter, the hybrid
    assert inner.fo.updates_in_backward and inner.last_phase == "zo"
    assert all(p.grad is None for p in model.parameters())
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), before)) > 0
    with pytest.raises(UsageError, match="the hybrid's phases take no per-group weight decay"):
        Trainer(tiny_gpt2(), _args(tmp_path / "wd", max_steps=4, weight_decay=0.1), data_collator=_pad,
                train_dataset=Examples(_lm_rows(DATA.forget.train)), optimizer_name="hybrid_float32").train()


@pytest.mark.parametrize("kwargs, message", [
    ({"optimizer_name": "adam"}, "unknown optimizer 'adam'"),
    ({"optimizer_name": "adazo", "optimizer_options": {"mu": -1.0}}, "invalid mu"),
    ({"optimizer_name": "adazo", "optimizer_options": {"weight_decay": 0.1}}, "TrainingArguments.weight_decay"),
    ({"optimizer_options": {"mu": 1e-3}}, "optimizer_options without optimizer_name"),
])
def test_bad_optimizer_settings_fail_at_construction(tmp_path, kwargs, message):
    with pytest.raises(UsageError, match=message):
        Trainer(tiny_gpt2(), _args(tmp_path), train_dataset=Examples([]), **kwargs)


def test_a_zeroth_order_step_outside_the_trainer_is_refused_clearly():
    adapter = StepAdapter(optim.AdaZO([torch.nn.Parameter(torch.zeros(3))]))
    with pytest.raises(UsageError, match="zeroth-order step needs a closure.*zounlearn.hf.Trainer"):
        adapter.step()


# ---------------------------------------------------------------------------------------
# Evaluation, logging, callbacks, SophiaG


class Steps(transformers.TrainerCallback):
    def __init__(self):
        self.ends, self.optimizer_steps = [], 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer_steps += 1

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(state.global_step)


def test_plain_trainer_with_zeroth_order_evaluates_logs_and_calls_back(tmp_path):
    rows = _lm_rows(DATA.forget.train)
    callback = Steps()
    model = tiny_gpt2()
    opt = optim.ZOSGD(model.parameters(), lr=1e-3, seed=0)
    trainer = Trainer(model, _args(tmp_path, max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                   eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4),
                      train_dataset=Examples(rows), eval_dataset=rows[:8], data_collator=_pad,
                      optimizers=(opt, None), callbacks=[callback])
    trainer.train()
    assert callback.ends == [1, 2, 3, 4] and callback.optimizer_steps == 4 and opt.draws == 4
    assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [2, 4]
    assert len(_logged_losses(trainer)) == 4
    assert trainer.state.log_history[-2]["eval_loss"] == pytest.approx(trainer.evaluate()["eval_loss"])


def test_sophia_refreshes_its_hessian_from_the_steps_last_micro_batch(tmp_path):
    """update_period 3 over 3 steps of 2 micro-batches: one refresh, after the third step, from its
    last micro-batch."""
    rows = _lm_rows(DATA.forget.train + DATA.retain.train[:9])
    model = tiny_gpt2()
    opt = optim.SophiaG(model.parameters(), lr=1e-3, update_period=3)
    seen = []
    trainer = Trainer(model, _args(tmp_path, max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2),
                      train_dataset=Examples(rows), data_collator=_pad, optimizers=(opt, None))
    real = trainer.hessian_loss
    trainer.hessian_loss = lambda m, inputs: seen.append(inputs["input_ids"]) or real(m, inputs)
    trainer.train()
    assert len(seen) == 1 and torch.equal(seen[0], _pad(rows[20:24])["input_ids"])
    assert all(s["hessian"].any() for s in opt.state.values())
