"""The robustness attacks and diagnostics: quantizers against hand-worked examples (levels,
scales, group edges, all-zero groups, both weight layouts), which weights a model-level
scheme touches, the noise's size, which examples relearning trains and evaluates on, that
no attack changes the model it is given, and the weight distance and mode connectivity
against direct computations, on the tiny models of tiny.py."""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from typing import ClassVar

import pytest
import torch
from tiny import DATA, assert_unchanged, nudge, snapshot, tiny_gpt2, tiny_llama, tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

from zounlearn.robustness import (
    NF4_LEVELS,
    QUANTIZATION_SCHEMES,
    add_weight_noise,
    add_weight_noise_,
    attacks,
    barrier_height,
    interpolate,
    mode_connectivity,
    noise_attack,
    quantization_attack,
    quantize_model,
    quantize_nf4,
    quantize_rtn,
    relearning_attack,
    relearning_split,
    retain_finetune_attack,
    target_weights,
    weight_distance,
)
from zounlearn.unlearning import Split
from zounlearn.unlearning.batches import Batches
from zounlearn.unlearning.evaluation import evaluate
from zounlearn.unlearning.objectives import cross_entropy

# Forget: one person (15 sentences, 5 questions, 5 multiple-choice); a little retain; the holdout person.
SMALL = dataclasses.replace(DATA, retain=Split("retain", train=DATA.retain.train[:6], qa=DATA.retain.qa[:6],
                                               choice=DATA.retain.choice[:2]))
EVAL = {"batch_size": 32}


def assert_metrics_equal(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert value == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


# --- quantizers by hand


def test_int4_per_channel_levels_and_scales_both_layouts():
    # Row 0: absmax 7, scale 1; row 1: absmax 14, scale 2 (one scale per output channel, not per tensor).
    weight = torch.tensor([[7.0, -2.4, 1.6, 0.2],
                           [-14.0, 3.4, 5.2, -0.9]])
    expected = torch.tensor([[7.0, -2.0, 2.0, 0.0],
                             [-14.0, 4.0, 6.0, 0.0]])
    torch.testing.assert_close(quantize_rtn(weight, 4), expected)
    # The Conv1D layout (in, out) holds the same channels as columns.
    torch.testing.assert_close(quantize_rtn(weight.T.contiguous(), 4, channel_dim=1), expected.T)
    # Read along the wrong dimension, the channels would be columns with other scales.
    assert not torch.allclose(quantize_rtn(weight.T.contiguous(), 4, channel_dim=0), expected.T)


def test_int8_scale_is_absmax_over_127():
    weight = torch.tensor([[127.0, 63.4, -1.2, -0.4]])
    torch.testing.assert_close(quantize_rtn(weight, 8), torch.tensor([[127.0, 63.0, -1.0, 0.0]]))
    # Half the absmax: scale 0.5, so steps of 0.5.
    torch.testing.assert_close(quantize_rtn(weight / 2, 8), torch.tensor([[63.5, 31.5, -0.5, 0.0]]))


def test_groups_edges_zero_groups_and_a_short_last_group():
    # Groups of 2 along the input dimension of 5: [0:2], [2:4], [4:5] (the last one shorter).
    weight = torch.tensor([[7.0, -2.4, 0.0, 0.0, 1.4],
                           [0.7, -0.14, 3.5, -1.1, -0.6]])
    expected = torch.tensor([[7.0, -2.0, 0.0, 0.0, 1.4],     # scales 1, (zero group), 0.2
                             [0.7, -0.1, 3.5, -1.0, -0.6]])  # scales 0.1, 0.5, 0.6/7
    out = quantize_rtn(weight, 4, group_size=2)
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(quantize_rtn(weight.T.contiguous(), 4, group_size=2, channel_dim=1), expected.T)
    # A group as long as the channel (or longer) is per-channel quantization.
    torch.testing.assert_close(quantize_rtn(weight, 4, group_size=5), quantize_rtn(weight, 4))
    torch.testing.assert_close(quantize_rtn(weight, 4, group_size=128), quantize_rtn(weight, 4))
    zeros = torch.zeros(3, 4)
    assert torch.equal(quantize_rtn(zeros, 4, group_size=2), zeros)
    assert torch.equal(quantize_nf4(zeros, group_size=2), zeros)


def test_group_edges_follow_the_input_dimension():
    # group_size 3 over 8 inputs: groups [0:3], [3:6], [6:8]; each group's maximum is kept exactly
    # and each element is a multiple of its own group's scale.
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 8, generator=generator)
    out = quantize_rtn(weight, 4, group_size=3)
    for row in range(4):
        for start, stop in ((0, 3), (3, 6), (6, 8)):
            scale = weight[row, start:stop].abs().max() / 7
            q = out[row, start:stop] / scale
            torch.testing.assert_close(q, q.round())
            assert q.abs().max() == pytest.approx(7.0)


def test_dtype_is_kept_and_arithmetic_is_float32():
    weight = torch.tensor([[7.0, -2.4, 1.6, 0.2]], dtype=torch.bfloat16)
    out = quantize_rtn(weight, 4)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, torch.tensor([[7.0, -2.0, 2.0, 0.0]], dtype=torch.bfloat16))
    assert quantize_nf4(weight, 4).dtype == torch.bfloat16


def test_nf4_nearest_level_by_hand():
    # Groups of 4: row 0 [2, -1, 0.3, 0.05] / 2 = [1, -0.5, 0.15, 0.025] -> levels 1, -0.5251, 0.1609, 0;
    # then the short group [0, -0.7] / 0.7 -> 0, -1. Row 1: a zero group, then [0.5, 0.45] / 0.5 -> 1, 1.
    weight = torch.tensor([[2.0, -1.0, 0.3, 0.05, 0.0, -0.7],
                           [0.0, 0.0, 0.0, 0.0, 0.5, 0.45]])
    levels = NF4_LEVELS
    expected = torch.tensor([[2.0, 2 * levels[2], 2 * levels[9], 0.0, 0.0, -0.7],
                             [0.0, 0.0, 0.0, 0.0, 0.5, 0.5]])
    assert levels[2] == pytest.approx(-0.5250730514526367) and levels[9] == pytest.approx(0.16093020141124725)
    torch.testing.assert_close(quantize_nf4(weight, group_size=4), expected)
    torch.testing.assert_close(quantize_nf4(weight.T.contiguous(), group_size=4, channel_dim=1), expected.T)
    # Every output is a level times its group's absmax.
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(3, 64, generator=generator)
    ratios = quantize_nf4(w, group_size=64) / w.abs().amax(dim=1, keepdim=True)
    distance = (ratios.unsqueeze(-1) - torch.tensor(levels)).abs().amin(-1)
    assert distance.max() < 1e-6
    # And it is the nearest level.
    nearest = torch.tensor(levels)[((w / w.abs().amax(dim=1, keepdim=True)).unsqueeze(-1)
                                    - torch.tensor(levels)).abs().argmin(-1)]
    torch.testing.assert_close(ratios, nearest)


def test_quantizer_arguments_are_checked():
    w = torch.ones(2, 4)
    for call, match in ((lambda: quantize_rtn(w, 1), "bits"), (lambda: quantize_rtn(w, 4, group_size=0), "group_size"),
                        (lambda: quantize_rtn(w, 4, channel_dim=2), "channel_dim"),
                        (lambda: quantize_rtn(torch.ones(2, 2, 2), 4), "2-D"),
                        (lambda: quantize_nf4(torch.ones(2, 4, dtype=torch.long)), "floating"),
                        (lambda: quantize_model(tiny_gpt2(), "int3"), "unknown quantization scheme")):
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_quantize_model_touches_only_block_linear_weights(build):
    model = build()
    before = snapshot(model)
    quantized = quantize_model(model, "int4")
    assert_unchanged(model, before)
    targets = {t.name: t.channel_dim for t in target_weights(model)}
    # GPT-2: c_attn, c_proj, c_fc, mlp.c_proj per block (Conv1D); Llama: q, k, v, o, gate, up, down (Linear).
    assert len(targets) == (4 * 2 if build is tiny_gpt2 else 7 * 4)
    assert set(targets.values()) == ({1} if build is tiny_gpt2 else {0})
    after = quantized.state_dict()
    for name, value in before.items():
        if name in targets:
            expected = quantize_rtn(value, 4, channel_dim=targets[name])
            assert torch.equal(after[name], expected) and not torch.equal(after[name], value), name
            # Each output channel is a multiple of its own scale: the layout was read right.
            channels = value.movedim(targets[name], 0)
            q = after[name].movedim(targets[name], 0) / (channels.abs().amax(1, keepdim=True) / 7)
            torch.testing.assert_close(q, q.round())
        else:  # embeddings, LM head, norms, biases, buffers
            assert torch.equal(after[name], value), name
    assert any("embed" in n or "wte" in n for n in before) and any("norm" in n or "ln_" in n for n in before)


def test_every_registered_scheme_runs_on_both_layouts():
    for build in (tiny_gpt2, tiny_llama):
        model = build()
        for scheme in QUANTIZATION_SCHEMES:
            quantized = quantize_model(model, scheme)
            assert all(p.isfinite().all() for p in quantized.parameters())


# --- noise


def test_noise_has_the_requested_rms_per_tensor():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=256, n_head=2, vocab_size=50, n_positions=8))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.weight.mul_(10)  # one tensor ten times larger: ten times the noise
    before = snapshot(model)
    noisy = add_weight_noise(model, 0.05, torch.Generator().manual_seed(0))
    assert_unchanged(model, before)
    targets = target_weights(model)
    after = noisy.state_dict()
    for target in targets:
        w = before[target.name]
        rms = w.square().mean().sqrt()
        noise_rms = (after[target.name] - w).square().mean().sqrt()
        # 65k-262k elements: the sample RMS of the noise is within 1% of its std; a wrong factor is not.
        assert noise_rms / rms == pytest.approx(0.05, rel=0.02), target.name
    for name in before.keys() - {t.name for t in targets}:
        assert torch.equal(after[name], before[name]), name
    # Same generator seed, same noise; in place returns the model it changed.
    again = copy.deepcopy(model)
    assert add_weight_noise_(again, 0.05, torch.Generator().manual_seed(0)) is again
    assert all(torch.equal(again.state_dict()[k], v) for k, v in after.items())
    with pytest.raises(ValueError, match="relative_std"):
        add_weight_noise(model, -0.1, torch.Generator())


# --- relearning: which examples, evaluated where


def test_relearning_split_uses_k_examples_and_holds_out_exactly_the_rest():
    split = relearning_split(SMALL, k=2, seed=3)
    qa = SMALL.forget.qa
    assert split.pool == "qa" and len(split.used) == 2 and split.used == tuple(sorted(split.used))
    assert split.examples == tuple(qa[i] for i in split.used)
    rest = tuple(e for i, e in enumerate(qa) if i not in split.used)
    assert split.heldout.forget.qa == rest and split.heldout.forget.train == rest
    asked = {e.prompt for e in split.examples}
    assert split.heldout.forget.choice == tuple(e for e in SMALL.forget.choice if e.prompt not in asked)
    assert len(split.heldout.forget.choice) == 3
    assert split.heldout.retain == SMALL.retain
    assert split.heldout.holdout.train == SMALL.holdout.qa  # answers against answers for the MIA
    # The seed decides; the same seed gives the same choice.
    assert relearning_split(SMALL, k=2, seed=3).used == split.used
    assert {relearning_split(SMALL, k=2, seed=s).used for s in range(10)} != {split.used}


def test_relearning_split_on_texts_when_there_are_no_questions():
    data = dataclasses.replace(SMALL, forget=Split("forget", train=SMALL.forget.train, choice=SMALL.forget.choice))
    split = relearning_split(data, k=4, seed=0)
    assert split.pool == "train"
    assert split.heldout.forget.train == tuple(e for i, e in enumerate(data.forget.train) if i not in split.used)
    assert split.heldout.forget.choice == data.forget.choice and split.heldout.holdout == data.holdout
    for k in (0, 15):
        with pytest.raises(ValueError, match="k must be an integer from 1 to 14"):
            relearning_split(data, k=k)


class Recorder(Batches):
    """Batches that remember what they were built on."""

    built: ClassVar[list[tuple]] = []

    def __init__(self, examples, *args, **kwargs):
        Recorder.built.append(tuple(examples))
        super().__init__(examples, *args, **kwargs)


def test_relearning_trains_on_the_chosen_examples_and_evaluates_on_the_rest(monkeypatch):
    model, tok = tiny_gpt2(seed=2), tokenizer()
    before = snapshot(model)
    Recorder.built = []
    monkeypatch.setattr(attacks, "Batches", Recorder)
    result = relearning_attack(model, tok, SMALL, k=2, steps=(0, 3), lr=1e-2, batch_size=2, seed=3, eval_kwargs=EVAL)
    assert_unchanged(model, before)
    split = relearning_split(SMALL, k=2, seed=3)
    assert Recorder.built == [split.examples]  # fine-tuning saw these two questions, nothing else
    assert result["used"] == list(split.used) and result["steps"] == [0, 3] and result["pool"] == "qa"
    # Step 0 is the model as given; step 3 is three AdamW steps on the chosen batch, done here by hand.
    assert_metrics_equal(result["heldout"][0], evaluate(model, tok, split.heldout, **EVAL))
    assert_metrics_equal(result["whole"][0], evaluate(model, tok, SMALL, **EVAL))
    tuned = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=1e-2, weight_decay=0.0)
    batches = Batches(split.examples, tok, 2, seed=3)
    for step in range(3):
        optimizer.zero_grad()
        cross_entropy(tuned, batches.batch(step)).backward()
        optimizer.step()
    assert_metrics_equal(result["heldout"][1], evaluate(tuned, tok, split.heldout, **EVAL))
    assert_metrics_equal(result["whole"][1], evaluate(tuned, tok, SMALL, **EVAL))
    assert result["heldout"][1]["forget/loss"] != result["heldout"][0]["forget/loss"]
    assert "retain/loss" in result["heldout"][1] and "mia_min_k" in result["heldout"][1]


def test_retain_finetuning_sees_no_forget_example_and_leaves_the_model(monkeypatch):
    model, tok = tiny_gpt2(seed=2), tokenizer()
    model.train()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    before = snapshot(model)
    Recorder.built = []
    monkeypatch.setattr(attacks, "Batches", Recorder)
    result = retain_finetune_attack(model, tok, SMALL, k=3, steps=(1,), lr=1e-2, batch_size=3, seed=1,
                                    eval_kwargs=EVAL)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's random stream is untouched
    assert_unchanged(model, before)
    assert model.training and all(m.training for m in model.modules())
    assert len(Recorder.built) == 1 and len(Recorder.built[0]) == 3
    assert set(Recorder.built[0]) <= set(SMALL.retain.qa)
    assert not set(Recorder.built[0]) & set(SMALL.forget.train + SMALL.forget.qa)
    assert result["used"] == [SMALL.retain.qa.index(e) for e in Recorder.built[0]]
    assert len(result["whole"]) == 1 and result["whole"][0].keys() == evaluate(model, tok, SMALL, **EVAL).keys()
    # Deterministic for a seed.
    again = retain_finetune_attack(model, tok, SMALL, k=3, steps=(1,), lr=1e-2, batch_size=3, seed=1,
                                   eval_kwargs=EVAL)
    assert again["whole"] == result["whole"]


def test_attack_arguments_are_checked_before_any_work():
    model, tok = tiny_gpt2(), tokenizer()
    for call, match in (
            (lambda: relearning_attack(model, tok, SMALL, k=5), "k must be"),
            (lambda: relearning_attack(model, tok, SMALL, k=1, steps=(5, 2)), "strictly increasing"),
            (lambda: relearning_attack(model, tok, SMALL, k=1, lr=0.0), "lr"),
            (lambda: relearning_attack(model, tok, SMALL, k=1, eval_kwargs={"batchsize": 4}), "batchsize"),
            (lambda: retain_finetune_attack(model, tok, SMALL, k=7), "k must be"),
            (lambda: quantization_attack(model, tok, SMALL, schemes=("int4", "fp8")), "fp8"),
            (lambda: noise_attack(model, tok, SMALL, draws=0), "draws"),
            (lambda: mode_connectivity(model, model, tok, SMALL, ts=(0, 0.5)), "endpoints")):
        with pytest.raises(ValueError, match=match):
            call()


# --- quantization and noise attacks


def test_quantization_attack_evaluates_the_quantized_copy():
    model, tok = tiny_llama(n_layer=2), tokenizer()
    before = snapshot(model)
    result = quantization_attack(model, tok, SMALL, schemes=("int4-g64", "nf4-g64"), eval_kwargs=EVAL)
    assert_unchanged(model, before)
    assert list(result) == ["int4-g64", "nf4-g64"]
    for scheme, metrics in result.items():
        assert_metrics_equal(metrics, evaluate(quantize_model(model, scheme), tok, SMALL, **EVAL))


def test_noise_attack_averages_draws_and_leaves_the_model():
    model, tok = tiny_gpt2(seed=4), tokenizer()
    before = snapshot(model)
    result = noise_attack(model, tok, SMALL, relative_stds=(0.0, 0.5), draws=2, seed=7, eval_kwargs=EVAL)
    assert_unchanged(model, before)
    clean = evaluate(model, tok, SMALL, **EVAL)
    assert_metrics_equal(result[0.0]["mean"], clean)
    assert all(v == 0 for v in result[0.0]["std"].values())
    runs = [evaluate(add_weight_noise(model, 0.5, torch.Generator().manual_seed(
        random.Random(f"7:{d}").getrandbits(63))), tok, SMALL, **EVAL) for d in range(2)]
    for key in clean:
        assert result[0.5]["mean"][key] == pytest.approx((runs[0][key] + runs[1][key]) / 2)
        assert result[0.5]["std"][key] == pytest.approx(abs(runs[0][key] - runs[1][key]) / 2)
    assert result[0.5]["std"]["forget/loss"] > 0


# --- diagnostics


def test_weight_distance_by_hand():
    original = tiny_gpt2()
    unlearned = copy.deepcopy(original)
    with torch.no_grad():
        unlearned.transformer.h[1].mlp.c_fc.weight[2, 5] += 3.0
        unlearned.transformer.wte.weight[0, 0] -= 4.0
    norm = math.sqrt(sum(p.double().square().sum().item() for p in original.parameters()))
    distance = weight_distance(original, unlearned)
    assert distance["total"] == pytest.approx(5.0)
    assert distance["relative"] == pytest.approx(5.0 / norm)
    assert distance["per_layer"] == pytest.approx({"0": 0.0, "1": 3.0, "other": 4.0})


def test_weight_distance_matches_a_direct_computation():
    original = tiny_llama(n_layer=2)
    unlearned = copy.deepcopy(original)
    nudge(unlearned)
    before = snapshot(original), snapshot(unlearned)
    distance = weight_distance(original, unlearned)
    assert_unchanged(original, before[0])
    assert_unchanged(unlearned, before[1])
    theirs = dict(unlearned.named_parameters())
    squares = {"0": 0.0, "1": 0.0, "other": 0.0}
    for name, p in original.named_parameters():
        key = name.split(".")[2] if name.startswith("model.layers.") else "other"
        squares[key] += (theirs[name].double() - p.double()).square().sum().item()
    assert distance["per_layer"] == pytest.approx({k: math.sqrt(v) for k, v in squares.items()})
    assert distance["total"] == pytest.approx(math.sqrt(sum(squares.values())))
    with pytest.raises(ValueError, match="different parameters"):
        weight_distance(tiny_llama(n_layer=2), tiny_llama(n_layer=3))


def test_interpolation_endpoints_and_midpoint():
    original, tok = tiny_gpt2(seed=5), tokenizer()
    unlearned = copy.deepcopy(original)
    nudge(unlearned)
    snapshots = snapshot(original), snapshot(unlearned)
    for t, expected in ((0, snapshots[0]), (1, snapshots[1])):
        mixed = interpolate(original, unlearned, t).state_dict()
        assert all(torch.equal(mixed[k], v) for k, v in expected.items())
    middle = dict(interpolate(original, unlearned, 0.5).named_parameters())
    for name, p in original.named_parameters():
        torch.testing.assert_close(middle[name], (p + dict(unlearned.named_parameters())[name]) / 2)
    result = mode_connectivity(original, unlearned, tok, SMALL, ts=(0, 0.5, 1), **EVAL)
    assert_unchanged(original, snapshots[0])
    assert_unchanged(unlearned, snapshots[1])
    assert result["t"] == [0.0, 0.5, 1.0]
    assert result["metrics"][0] == evaluate(original, tok, SMALL, **EVAL)
    assert result["metrics"][2] == evaluate(unlearned, tok, SMALL, **EVAL)
    assert set(result["barrier"]) == {"forget/loss", "retain/loss", "forget/qa_accuracy", "retain/qa_accuracy",
                                      "forget/choice_accuracy", "retain/choice_accuracy"}
    losses = [m["forget/loss"] for m in result["metrics"]]
    assert result["barrier"]["forget/loss"] == pytest.approx(max(0.0, losses[1] - (losses[0] + losses[2]) / 2))


def test_barrier_of_a_hand_made_curve():
    ts = [0, 0.25, 0.5, 0.75, 1]
    # Loss line 1 + t: rises 0.75, 2, 0.25 above it; accuracy line 0.8 - 0.2 t: dips 0.25, 0.5, 0.25.
    assert barrier_height(ts, [1.0, 2.0, 3.5, 2.0, 2.0]) == pytest.approx(2.0)
    assert barrier_height(ts, [0.8, 0.5, 0.2, 0.4, 0.6], higher_is_better=True) == pytest.approx(0.5)
    assert barrier_height([0, 0.5, 1], [1.0, 0.5, 1.0]) == 0.0  # below the line: no barrier
    assert barrier_height([1, 0, 0.5], [2.0, 1.0, 1.6]) == pytest.approx(0.1)  # any order of t
    with pytest.raises(ValueError, match="endpoints"):
        barrier_height([0, 0.5], [1.0, 2.0])
