"""Batches (the join rule, labels, truncation, deterministic order) and the objectives against
hand computations from the logits and hidden states of tiny GPT-2 and Llama models, each
reference's formula transcribed (SimNPO as its authors' code, RMU in WMDP's and open-unlearning's
forms on the same inputs, the KL retain term as TOFU's kl_div); the NPO, RMU and KL caches,
both grad modes, RMU's blocks and parameters, seed 002's two defenses, the registry and bad input.

The tokenizer (a byte-level BPE trained on the synthetic corpus, nothing downloaded), the
tiny models and the hand computations live in tiny.py."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import DATA, hand_ce, hand_log_likelihoods, nudge, tiny_gpt2, tiny_llama, tokenizer

from zounlearn.unlearning.batches import IGNORE, Batches, answer_log_likelihoods, join, tokenize_examples
from zounlearn.unlearning.objectives import (
    GA,
    NPO,
    OBJECTIVES,
    RMU,
    FineTune,
    GradDiff,
    SimNPO,
    WeightDistortion,
    WeightDistReg,
    make_objective,
    transformer_blocks,
)


@pytest.fixture(scope="module")
def forget() -> Batches:
    return Batches(DATA.forget.train, tokenizer(), 4, seed=0)


@pytest.fixture(scope="module")
def retain() -> Batches:
    return Batches(DATA.retain.qa[:12], tokenizer(), 4, seed=0)


# --- batches


def test_join_rule():
    assert join("Where was X born?", "Lisbon") == "Where was X born? Lisbon"
    assert join("", "A sentence.") == "A sentence."
    assert join("The start of a text ", "and its end") == "The start of a text and its end"
    assert join("Line one\n", "line two") == "Line one\nline two"
    assert join("prefix", " continuation") == "prefix continuation"


def test_labels_mark_answer_and_eos_only():
    tok = tokenizer()
    examples = [DATA.forget.qa[0], DATA.forget.train[0], DATA.retain.qa[3]]
    batch = Batches(examples, tok, 3, shuffle=False).batch(0)
    for row, e in enumerate(examples):
        prompt = tok(e.prompt)["input_ids"]
        full = tok(join(e.prompt, e.answer))["input_ids"] + [tok.eos_token_id]
        n = len(full)
        assert batch.input_ids[row, :n].tolist() == full
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
        assert batch.labels[row, :len(prompt)].eq(IGNORE).all() and batch.labels[row, n:].eq(IGNORE).all()
        assert batch.labels[row, len(prompt):n].tolist() == full[len(prompt):]
        answer = tok.decode(batch.labels[row, len(prompt):n - 1].tolist())
        assert answer == (" " + e.answer if e.prompt else e.answer)
    assert batch.indices.tolist() == [0, 1, 2]


def test_truncation_keeps_the_prompt_and_cuts_the_answer():
    tok = tokenizer()
    example = DATA.forget.qa[0]
    full = tokenize_examples(tok, [example])[0]
    assert full.n_answer >= 2 and not full.truncated
    cut = tokenize_examples(tok, [example], max_length=full.n_prompt + 1)[0]
    assert cut.ids == full.ids[:full.n_prompt + 1] and cut.n_prompt == full.n_prompt and cut.truncated
    assert tokenize_examples(tok, [example], max_length=len(full.ids))[0] == full
    with pytest.raises(ValueError, match="prompt alone is .* tokens.*limit of 3 tokens"):
        tokenize_examples(tok, [example], max_length=3)  # the prompt is longer: no room for the answer
    with pytest.raises(ValueError, match="max_length"):
        tokenize_examples(tok, [example], max_length=1)


def test_batches_are_deterministic_and_cover_every_example():
    examples = DATA.retain.train[:10]
    a, b = Batches(examples, tokenizer(), 3, seed=5), Batches(examples, tokenizer(), 3, seed=5)
    assert len(a) == 4 and len(Batches(examples, tokenizer(), 3, drop_last=True)) == 3
    epoch0 = [x.indices.tolist() for x in a.epoch(0)]
    assert epoch0 == [b.batch(i).indices.tolist() for i in range(4)]
    assert sorted(sum(epoch0, [])) == list(range(10)) and epoch0 != [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert [x.indices.tolist() for x in a.epoch(1)] != epoch0
    assert a.batch(5).indices.tolist() == [x.indices.tolist() for x in b.epoch(1)][1]
    assert [x.indices.tolist() for x in Batches(examples, tokenizer(), 3, seed=6).epoch(0)] != epoch0
    assert sum((x.indices.tolist() for x in a.in_order()), []) == list(range(10))
    dropped = Batches(examples, tokenizer(), 3, seed=5, drop_last=True)
    assert all(len(x) == 3 for x in dropped.epoch(0))
    with pytest.raises(ValueError, match="drop_last"):
        Batches(examples, tokenizer(), 11, drop_last=True)
    with pytest.raises(ValueError, match="no examples"):
        Batches((), tokenizer(), 2)


def test_log_likelihoods_by_hand_and_float32_for_bfloat16(forget):
    model, batch = tiny_gpt2(), forget.batch(0)
    ll, n = answer_log_likelihoods(model, batch)
    hand = hand_log_likelihoods(model, batch)
    assert n.tolist() == [count for _, count in hand]
    torch.testing.assert_close(ll.double(), torch.tensor([x for x, _ in hand], dtype=torch.float64), rtol=1e-5,
                               atol=1e-4)
    ll16, _ = answer_log_likelihoods(model.to(torch.bfloat16), batch)
    assert ll16.dtype == torch.float32
    torch.testing.assert_close(ll16, ll, rtol=0.05, atol=0.5)


# --- objectives against hand computations


def test_ga_and_graddiff_by_hand(forget, retain):
    model = tiny_gpt2()
    fb, rb = forget.batch(0), retain.batch(0)
    assert make_objective("ga")(model, fb).item() == pytest.approx(-hand_ce(model, fb), rel=1e-5)
    expected = -hand_ce(model, fb) + 0.5 * hand_ce(model, rb)
    assert GradDiff(retain_weight=0.5)(model, fb, rb).item() == pytest.approx(expected, rel=1e-5)
    assert GradDiff().retain_weight == 1.0


def test_npo_by_hand(forget, retain):
    model = tiny_gpt2()
    fb, rb = forget.batch(1), retain.batch(0)
    reference = hand_log_likelihoods(model, fb)
    npo = NPO(beta=0.1, retain_weight=0.7)
    npo.prepare(model, forget)
    nudge(model)
    now = hand_log_likelihoods(model, fb)
    forget_term = -(2 / 0.1) * sum(math.log(1 / (1 + math.exp(0.1 * (x - r)))) for (x, _), (r, _)
                                   in zip(now, reference)) / len(now)
    expected = forget_term + 0.7 * hand_ce(model, rb)
    assert npo(model, fb, rb).item() == pytest.approx(expected, rel=1e-5)


def test_npo_starts_at_two_over_beta_log_two(forget):
    model = tiny_gpt2()
    npo = NPO(beta=0.1, retain_weight=0.0)
    npo.prepare(model, forget)
    for batch in forget.epoch(0):
        assert npo(model, batch).item() == pytest.approx(20 * math.log(2), rel=1e-4)


def _summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The references' get_batch_loss / compute_batch_nll: CE summed over each row's shifted labels."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).double(), labels[:, 1:],
                                             ignore_index=IGNORE, reduction="none").sum(-1)


def test_simnpo_is_the_authors_computation(forget, retain):
    """OPTML-Group/Unlearn-Simple's simnpo_grad_diff, transcribed: forget_loss = NLL / |y| - gamma,
    -logsigmoid(beta forget_loss).mean() * 2 / beta, then npo_coeff * it + grad_diff_coeff * retain CE."""
    model = tiny_gpt2()
    # Question/answer pairs, as TOFU's: the first token is prompt, so the labels count the predicted tokens.
    fb, rb = Batches(DATA.forget.qa, tokenizer(), 5).batch(0), retain.batch(1)
    beta, gamma, npo_coeff, coeff = 0.2, 0.5, 0.125, 2.0  # a small beta keeps the sigmoid off its flat tail
    with torch.no_grad():
        logits = model(input_ids=fb.input_ids, attention_mask=fb.attention_mask).logits
    forget_loss = _summed_nll(logits, fb.labels) / (fb.labels != IGNORE).sum(-1) - gamma
    forget_term = (-torch.nn.functional.logsigmoid(beta * forget_loss).mean() * 2 / beta).item()
    ours = SimNPO(beta=beta, delta=gamma, forget_weight=npo_coeff, retain_weight=0.0)
    assert ours(model, fb).item() == pytest.approx(npo_coeff * forget_term, rel=1e-5)
    expected = npo_coeff * forget_term + coeff * hand_ce(model, rb)
    ours = SimNPO(beta=beta, delta=gamma, forget_weight=npo_coeff, retain_weight=coeff)
    assert ours(model, fb, rb).item() == pytest.approx(expected, rel=1e-5)
    defaults = SimNPO()  # the authors' TOFU forget10 command: beta 4.5, gamma 0, npo_coeff 0.125, coeff 1
    assert (defaults.beta, defaults.delta, defaults.forget_weight, defaults.retain_weight) == (4.5, 0.0, 0.125, 1.0)


def _padded_hidden(model, batch, layer: int) -> torch.Tensor:
    """Block `layer`'s output (B, T, H) at every position of the padded batch, from output_hidden_states."""
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     output_hidden_states=True).hidden_states[layer + 1].double()


def test_rmu_in_both_forms_on_the_same_inputs(forget, retain):
    """WMDP's rmu/unlearn.py: mse_loss over (B, T, H) of the padded batch, padding included; open-unlearning's
    compute_activation_loss: per row, the hidden-unit mean summed over answer positions over their count."""
    model = tiny_gpt2(n_layer=3)
    fb, rb = forget.batch(0), retain.batch(2)
    assert (fb.attention_mask == 0).any() and (rb.attention_mask == 0).any()  # both batches have padding
    frozen = _padded_hidden(model, rb, 1)
    forms = {form: RMU(steering_coeff=3.0, alpha=50.0, layer=1, seed=4, form=form) for form in ("wmdp",
                                                                                               "open-unlearning")}
    for rmu in forms.values():
        rmu.prepare(model, forget, retain)
    nudge(model)
    u = torch.rand(32, generator=torch.Generator().manual_seed(4)).double()
    target = 3.0 * u / u.norm()
    hf, hr = _padded_hidden(model, fb, 1), _padded_hidden(model, rb, 1)
    wmdp = (hf - target).pow(2).mean() + 50.0 * (hr - frozen).pow(2).mean()

    def masked(squared, batch):
        mask = (batch.labels != IGNORE).double()
        return ((squared.mean(-1) * mask).sum(1) / mask.sum(1)).mean()

    open_unlearning = masked((hf - target).pow(2), fb) + 50.0 * masked((hr - frozen).pow(2), rb)
    assert forms["wmdp"](model, fb, rb).item() == pytest.approx(wmdp.item(), rel=1e-5)
    assert forms["open-unlearning"](model, fb, rb).item() == pytest.approx(open_unlearning.item(), rel=1e-5)
    assert abs(wmdp - open_unlearning) > 1e-3 * wmdp  # the two reductions differ on these inputs
    # A retain batch of other examples than the cached ones is refused.
    with pytest.raises(ValueError, match="not from the Batches RMU was prepared on"):
        forms["wmdp"](model, fb, Batches(DATA.retain.train[:4], tokenizer(), 4).batch(0))


def test_rmu_runs_only_the_blocks_up_to_its_layer(forget):
    model = tiny_gpt2(n_layer=3)
    calls = []
    for i, block in enumerate(model.transformer.h):
        block.register_forward_hook(lambda *args, i=i: calls.append(i))
    RMU(layer=1, alpha=0.0)(model, forget.batch(0))
    assert calls == [0, 1]


# --- caches, grad modes


def test_npo_reference_is_computed_once(forget, retain):
    model = tiny_gpt2()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    npo = NPO()
    npo.prepare(model, forget, retain)
    assert len(calls) == len(forget) == 4  # 15 examples in batches of 4, the retain set untouched
    for step in range(6):
        with torch.no_grad():
            npo(model, forget.batch(step), retain.batch(step))
        npo(model, forget.batch(step), retain.batch(step)).backward()
    assert len(calls) == 4 + 6 * 2 * 2  # one forget and one retain pass per call: no reference pass


def test_rmu_caches_every_retain_example_once_at_full_width(forget, retain):
    model = tiny_gpt2()
    rmu = RMU(layer=1)
    calls = []
    model.transformer.h[1].register_forward_hook(lambda *args: calls.append(1))
    rmu.prepare(model, forget, retain)
    assert len(calls) == len(retain) and sorted(rmu.frozen.values) == list(range(len(retain.examples)))
    width = max(len(t.ids) for t in retain.tokens)
    assert all(v.shape == (width, 32) for v in rmu.frozen.values.values())


def test_kl_retain_term_by_hand_cached_or_from_a_frozen_copy(forget, retain):
    """TOFU's KL (and NPO-KL, open-unlearning's retain_loss_type KL): kl_div(log p_theta, log p_original,
    batchmean, log_target) over every position of the padded batch, here from hand log-softmaxes."""
    model = tiny_gpt2()
    fb, rb = forget.batch(0), retain.batch(1)
    with torch.no_grad():
        original = model(input_ids=rb.input_ids, attention_mask=rb.attention_mask).logits.double().log_softmax(-1)
    objectives = {reference: GradDiff(retain_weight=2.0, retain_loss="kl", kl_reference=reference)
                  for reference in ("cache", "model")}
    for objective in objectives.values():
        objective.prepare(model, forget, retain)
        assert objective(model, fb, rb).item() == pytest.approx(-hand_ce(model, fb), abs=1e-5)  # KL 0 at the start
    nudge(model)
    with torch.no_grad():
        now = model(input_ids=rb.input_ids, attention_mask=rb.attention_mask).logits.double().log_softmax(-1)
    kl = (original.exp() * (original - now)).sum() / (rb.input_ids.numel())  # batchmean over B * T positions
    for objective in objectives.values():
        assert objective(model, fb, rb).item() == pytest.approx(-hand_ce(model, fb) + 2.0 * kl.item(), rel=1e-5)
    assert objectives["model"].kl.frozen is not None and objectives["model"].kl.cache is None
    npo = NPO(retain_loss="kl")
    npo.prepare(model, forget, retain)
    assert npo.kl.cache is not None and len(npo.kl.cache.values) == len(retain.examples)


def test_weight_distortion_adds_seeded_noise_after_the_inner_objective_prepared(forget, retain):
    model, plain = tiny_gpt2(), NPO(retain_weight=0.0)
    plain.prepare(model, forget)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    defended = make_objective("npo", retain_weight=0.0, weight_distortion=0.02, distortion_seed=3)
    assert isinstance(defended, WeightDistortion) and defended.name == "npo"
    defended.prepare(model, forget)
    generator = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():  # every parameter, in order, from the seed's stream
        torch.testing.assert_close(p.detach(), before[name] + 0.02 * torch.randn(p.shape, generator=generator))
    assert torch.equal(defended.inner.reference, plain.reference)  # NPO's reference is the original model's
    after = NPO(retain_weight=0.0)
    after.prepare(model, forget)
    assert not torch.allclose(after.reference, plain.reference)  # which the noise did change


def test_weight_dist_reg_by_hand_with_both_kinds_of_optimizer(forget, retain):
    model = tiny_gpt2()
    original = [p.detach().clone() for p in model.parameters()]
    defended = make_objective("graddiff", weight_dist_reg=1.5)
    assert isinstance(defended, WeightDistReg)
    defended.prepare(model, forget, retain)
    fb, rb = forget.batch(0), retain.batch(0)
    assert defended(model, fb, rb).item() == pytest.approx(GradDiff()(model, fb, rb).item() - 1.5 * 1e-4, rel=1e-5)
    nudge(model)
    squares = sum((p.detach().double() - p0.double()).pow(2).sum() for p, p0 in zip(model.parameters(), original))
    rms = math.sqrt(squares.item() / sum(p.numel() for p in original) + 1e-8)
    assert defended(model, fb, rb).item() == pytest.approx(GradDiff()(model, fb, rb).item() - 1.5 * rms, rel=1e-5)
    defended(model, fb, rb).backward()  # first order: the distance term has a gradient on every parameter
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    from zounlearn.optim import ZOSGD

    optimizer = ZOSGD(defended.parameters(model), lr=1e-3, seed=0)  # zeroth order: the closure under no_grad
    assert math.isfinite(float(optimizer.step(lambda: defended(model, fb, rb))))


def test_finetune_is_the_retain_cross_entropy(forget, retain):
    model = tiny_gpt2()
    fb, rb = forget.batch(0), retain.batch(0)
    assert FineTune()(model, fb, rb).item() == pytest.approx(hand_ce(model, rb), rel=1e-5)
    assert make_objective("finetune").needs_retain
    with pytest.raises(ValueError, match="invalid retain_weight"):
        FineTune(retain_weight=0.0)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_no_grad_and_grad(name, forget, retain):
    model = tiny_gpt2()
    objective = make_objective(name, **({"layer": 1} if name == "rmu" else {}))
    objective.prepare(model, forget, retain)
    fb, rb = forget.batch(2), retain.batch(1)
    with torch.no_grad():
        value = objective(model, fb, rb)
    assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value)
    loss = objective(model, fb, rb)
    assert loss.item() == pytest.approx(value.item(), rel=1e-6)
    loss.backward()
    trained = objective.parameters(model)
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_objectives_train_with_a_zounlearn_optimizer(forget, retain):
    from zounlearn.optim import ZOSGD

    model = tiny_gpt2()
    ga = GA()
    before = ga(model, forget.batch(0)).item()
    optimizer = ZOSGD(ga.parameters(model), lr=1e-2, seed=0)
    for _ in range(3):
        optimizer.step(lambda: ga(model, forget.batch(0)))
    assert ga(model, forget.batch(0)).item() != before


# --- RMU's blocks and parameters


def test_transformer_blocks_of_gpt2_and_llama():
    gpt2, llama = tiny_gpt2(n_layer=4), tiny_llama(n_layer=4)
    assert transformer_blocks(gpt2) is gpt2.transformer.h
    assert transformer_blocks(llama) is llama.model.layers
    assert transformer_blocks(llama.model) is llama.model.layers
    with pytest.raises(ValueError, match="cannot find the transformer blocks of Linear"):
        transformer_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("build, blocks, mlp_out", [(tiny_gpt2, lambda m: m.transformer.h, lambda b: b.mlp.c_proj),
                                                    (tiny_llama, lambda m: m.model.layers, lambda b: b.mlp.down_proj)])
def test_rmu_parameters_are_the_chosen_blocks_mlp_output_projections(build, blocks, mlp_out):
    model = build(n_layer=4)
    ids = lambda params: sorted(id(p) for p in params)  # noqa: E731
    layers = blocks(model)
    assert ids(RMU(layer=2).parameters(model)) == ids(mlp_out(layers[i]).weight for i in (0, 1, 2))
    assert ids(RMU(layer=1, params="block").parameters(model)) == ids(p for i in (0, 1) for p in layers[i].parameters())
    assert ids(RMU(layer=3, update_layers=[3]).parameters(model)) == ids([mlp_out(layers[3]).weight])
    assert RMU().layer == 7 and RMU().update_layers == (5, 6, 7) and (RMU().form, RMU().params) == ("wmdp", "mlp")
    with pytest.raises(ValueError, match="reach past the 4 blocks"):
        RMU(layer=7).parameters(model)


def test_rmu_on_llama(retain):
    model = tiny_llama()
    forget = Batches(DATA.forget.qa, tokenizer(), 5, shuffle=False)
    rmu = RMU(layer=2, alpha=10.0)
    rmu.prepare(model, forget, retain)
    loss = rmu(model, forget.batch(0), retain.batch(0))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in rmu.parameters(model))
    assert all(p.grad is None for p in model.model.layers[3].parameters())  # stopped after block 2


# --- bad input


def test_registry_and_make_objective_errors():
    assert set(OBJECTIVES) == {"ga", "graddiff", "npo", "simnpo", "rmu", "finetune"}
    assert isinstance(make_objective("NPO", beta=0.2), NPO)
    with pytest.raises(ValueError, match="unknown objective 'dpo'; use one of ga, graddiff, npo, simnpo, rmu"):
        make_objective("dpo")
    with pytest.raises(ValueError, match="npo has no hyperparameter gamma; its hyperparameters: beta, retain_weight"):
        make_objective("npo", gamma=1.0)
    with pytest.raises(ValueError, match="give weight_distortion=STD too"):
        make_objective("npo", distortion_seed=1)
    with pytest.raises(ValueError, match="ga has no hyperparameter beta"):
        make_objective("ga", beta=1.0)


@pytest.mark.parametrize("build", [lambda: NPO(beta=0), lambda: NPO(beta=-1.0), lambda: SimNPO(beta=float("nan")),
                                   lambda: SimNPO(delta=-0.1), lambda: GradDiff(retain_weight=-1),
                                   lambda: GradDiff(retain_loss="mse"), lambda: NPO(kl_reference="disk"),
                                   lambda: RMU(form="tofu"), lambda: RMU(params="all"),
                                   lambda: make_objective("ga", weight_distortion=-0.1),
                                   lambda: make_objective("ga", weight_dist_reg=0.0),
                                   lambda: NPO(beta=True), lambda: RMU(steering_coeff=0), lambda: RMU(alpha=-1),
                                   lambda: RMU(layer=-1), lambda: RMU(layer=1.5), lambda: RMU(update_layers=[])])
def test_bad_hyperparameters(build):
    with pytest.raises(ValueError, match="invalid|update_layers|must be one of"):
        build()


def test_missing_retain_or_preparation_is_a_clear_error(forget, retain):
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="needs a retain batch"):
        GradDiff()(model, forget.batch(0))
    assert GradDiff(retain_weight=0)(model, forget.batch(0)).item() == pytest.approx(-hand_ce(model, forget.batch(0)),
                                                                                   rel=1e-5)
    with pytest.raises(ValueError, match="call prepare"):
        NPO(retain_weight=0)(model, forget.batch(0))
    with pytest.raises(ValueError, match="call prepare"):
        RMU(layer=1)(model, forget.batch(0), retain.batch(0))
    npo = NPO(retain_weight=0)
    npo.prepare(model, forget)
    other = Batches(DATA.retain.train[:4], tokenizer(), 4, shuffle=False)
    with pytest.raises(ValueError, match="not from the Batches NPO was prepared on"):
        npo(model, other.batch(0))
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        RMU(layer=5, alpha=0)(model, forget.batch(0))
