"""The hybrid presets of the registry and the shared state of the hybrid's two phases: what each
preset builds, that a shared state is one state (against loop twins that share theirs), that it
round-trips through a state dict saved once, and that bad presets, pairs and options are refused."""

from __future__ import annotations

import loop_twins
import pytest
import torch
from test_in_backward import assert_identical
from test_optim import make_params, run, targets

from zounlearn import optim
from zounlearn.errors import UsageError
from zounlearn.optim.registry import HYBRID_PRESETS, OPTIMIZERS, make_optimizer, optimizer_options
from zounlearn.optim.shared_state import check_shareable

# preset: (first-order class, zeroth-order class, in backward, shared); the state is float32 but
# where STATE_DTYPE says otherwise
BUILDS = {
    "hybrid": (optim.AdamW, optim.AdaZO, True, False),
    "hybrid_float32": (torch.optim.AdamW, optim.AdaZO, False, False),
    "hybrid_adam_shared": (optim.AdamW, optim.ZOAdam, True, True),
    "hybrid_signadam": (optim.SignAdam, optim.ZOSGD, True, False),
    "hybrid_signadam_shared": (optim.SignAdam, optim.ZOSignAdam, True, True),
    "hybrid_signsgd": (optim.SignSGD, optim.ZOSGD, True, False),
}
STATE_DTYPE = {"hybrid": torch.bfloat16, "hybrid_adam_shared": torch.bfloat16, "hybrid_signadam": torch.bfloat16}


def test_every_preset_is_in_the_table():
    assert set(BUILDS) == set(HYBRID_PRESETS) == {n for n, s in OPTIMIZERS.items() if s.grade == "hybrid"}


@pytest.mark.parametrize("name", list(BUILDS))
def test_each_preset_builds_what_it_says(name):
    fo_cls, zo_cls, in_backward, shared = BUILDS[name]
    params = make_params(torch.float32)
    opt = make_optimizer(name, params, lr=1e-2, seed=1, block=1, total_steps=4, zo_mu=1e-2)
    assert type(opt.fo) is fo_cls and type(opt.zo) is zo_cls
    assert getattr(opt.fo, "updates_in_backward", False) == in_backward
    assert (opt.zo.state is opt.fo.state) == shared == opt.shared_state
    run(opt, params, targets(), 4)  # FO, ZO, FO, ZO
    assert all(p.grad is None for p in params)
    moments = [t for o in (opt.fo, opt.zo) for st in o.state.values() for t in st.values()
               if isinstance(t, torch.Tensor) and t.numel() > 1]
    assert moments and {t.dtype for t in moments} == {STATE_DTYPE.get(name, torch.float32)} or name == "hybrid_signsgd"
    if shared:  # one state, counted by both phases
        assert [opt.fo.state[p]["step"] for p in params] == [4] * 4


# The shared pairs in float32, against float32 twins (the preset hybrid_adam_shared keeps bfloat16).
SHARED_FLOAT32 = {"fo_in_backward": True, "shared_state": True, "fo_state_dtype": "float32",
                  "zo_state_dtype": "float32"}


@pytest.mark.parametrize("fo_twin, zo_twin, name, options", [
    (loop_twins.SignAdam, loop_twins.ZOSignAdam, "hybrid_signadam_shared", {}),
    (loop_twins.AdamW, loop_twins.ZOAdam, "hybrid",
     {**SHARED_FLOAT32, "fo_optimizer": "adamw", "zo_optimizer": "zo_adam"}),
])
def test_shared_state_is_one_state_for_both_phases(fo_twin, zo_twin, name, options):
    """Against loop twins whose two phases keep one state dict (ZOLoop and FOLoop count steps in it)."""
    fused_params, twin_params = make_params(torch.float32), make_params(torch.float32)
    fused = make_optimizer(name, fused_params, lr=1e-2, seed=7, block=2, zo_block=1, total_steps=7, zo_mu=1e-2,
                           **options)
    fo, zo = fo_twin(twin_params, lr=1e-2), zo_twin(twin_params, lr=1e-2, mu=1e-2, seed=7)
    zo.state = fo.state
    twin = loop_twins.HybridFOZO(fo, zo, block=2, zo_block=1, total_steps=7)
    target = targets()
    for step in range(7):
        assert run(fused, fused_params, target, 1) == pytest.approx(run(twin, twin_params, target, 1), rel=1e-4)
    for a, b in zip(fused_params, twin_params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-5, atol=2e-6)
    for p, q in zip(fused_params, twin_params):
        assert fused.fo.state[p]["step"] == fo.state[q]["t"] == 7
        torch.testing.assert_close(fused.fo.state[p]["exp_avg"], fo.state[q]["exp_avg"], rtol=2e-5, atol=2e-6)


def test_shared_state_round_trips_and_is_saved_once():
    def fresh(params):
        return make_optimizer("hybrid_signadam_shared", params, lr=1e-2, seed=2, block=2, total_steps=8, zo_mu=1e-2)

    target = targets()
    whole_params, resumed_params = make_params(torch.float32), make_params(torch.float32)
    whole = fresh(whole_params)
    run(whole, whole_params, target, 3)
    saved = whole.state_dict()
    assert saved["zo"]["state"] == {} and saved["fo"]["state"] and saved["shared_state"] is True
    with torch.no_grad():
        for p, q in zip(resumed_params, whole_params):
            p.copy_(q)
    resumed = fresh(resumed_params)
    resumed.load_state_dict(saved)
    assert resumed.zo.state is resumed.fo.state
    run(whole, whole_params, target, 5)
    run(resumed, resumed_params, target, 5)
    assert_identical(whole_params, resumed_params, whole, resumed)
    unshared = make_optimizer("hybrid_signadam", make_params(torch.float32), block=2, total_steps=8)
    with pytest.raises(UsageError, match="shared_state is True, this optimizer's False"):
        unshared.load_state_dict(saved)


@pytest.mark.parametrize("fo, zo, message", [
    (lambda g: torch.optim.AdamW(g), lambda g: optim.ZOAdam(g), "must be one of zounlearn's fused"),
    (lambda g: optim.AdamW(g), lambda g: optim.AdaZO(g), "keep different statistics"),
    (lambda g: optim.SignAdam(g), lambda g: optim.ZOSGD(g), "keep different statistics"),
    (lambda g: optim.SGD(g, momentum=0.9), lambda g: optim.ZOSGD(g), r"\(sgd and descent\)"),
    (lambda g: optim.SophiaG(g), lambda g: optim.ZOAdam(g), "keep different statistics"),
])
def test_pairs_that_cannot_share_are_refused(fo, zo, message):
    params = make_params(torch.float32)
    with pytest.raises(UsageError, match=message):
        optim.HybridFOZO(params, fo_optimizer=fo, zo_optimizer=zo, shared_state=True)


def test_momentum_sgd_pairs_share_their_buffer():
    groups = [{"params": make_params(torch.float32)}]
    assert check_shareable(optim.SGD(groups, momentum=0.9), optim.ZOSGD(groups, momentum=0.9)) == \
        "the momentum buffer"


@pytest.mark.parametrize("name, options, message", [
    ("hybrid_signadam", {"fo_optimizer": "adamw"}, "preset hybrid_signadam fixes fo_optimizer=signadam"),
    ("hybrid_signadam", {"zo_betas": (0.9, 0.99)}, "zo_optimizer zo_sgd has no option betas"),
    ("hybrid", {"zo_optimizer": "adamw"}, "zo_optimizer must be a zeroth-order optimizer"),
    ("hybrid", {"fo_optimizer": "signadam", "fo_update_clip": 1.0}, "SignAdam takes no update_clip"),
    ("hybrid", {"shared_state": "yes"}, "shared_state must be true or false"),
    ("hybrid", {"shared_state": True}, "AdamW and AdaZO cannot share"),
    ("signadam", {"in_backward": 1}, "in_backward must be true or false"),
    ("adamw", {"in_backward": True, "amsgrad": True}, "fused AdamW, which has no option amsgrad"),
    ("signsgd", {"update_clip": 1.0}, "SignSGD takes no update_clip"),
    ("adamw", {"update_clip": 0.0}, "invalid update_clip"),
])
def test_bad_presets_and_options_are_named(name, options, message):
    with pytest.raises(UsageError, match=message):
        make_optimizer(name, make_params(torch.float32), **options)


def test_an_error_names_the_defaults_in_effect_and_only_those():
    with pytest.raises(UsageError, match=r"SophiaG keeps float32 state.*with hybrid's defaults fo_in_backward=True, "
                                         r"fo_state_dtype=bfloat16, zo_state_dtype=bfloat16"):
        make_optimizer("hybrid", make_params(torch.float32), fo_optimizer="sophia")
    with pytest.raises(UsageError, match=r"SophiaG keeps float32 state.*defaults fo_in_backward=True, "
                                         r"zo_state_dtype=bfloat16; give") as info:
        make_optimizer("hybrid", make_params(torch.float32), fo_optimizer="sophia", fo_state_dtype="bfloat16")
    assert "fo_state_dtype=bfloat16;" not in info.value.args[0].split("with hybrid's defaults")[1]
    with pytest.raises(UsageError, match="SignSGD takes no update_clip") as info:  # a preset: no defaults
        make_optimizer("hybrid_signsgd", make_params(torch.float32), fo_update_clip=1.0)
    assert "defaults" not in str(info.value)


def test_first_order_names_update_in_backward_on_request():
    params = make_params(torch.float32)
    for name in ("adamw", "sgd", "signsgd", "signadam", "compressed_adam", "sophia"):
        assert "in_backward" in optimizer_options(name)
        opt = make_optimizer(name, params, in_backward=True)
        assert isinstance(opt, optim.FusedOptimizer) and opt.updates_in_backward
        opt.update_in_backward(False)
    adamw = make_optimizer("adamw", params, update_clip=1.0)
    assert isinstance(adamw, optim.AdamW) and adamw.param_groups[0]["update_clip"] == 1.0
    assert isinstance(make_optimizer("adamw", params), torch.optim.AdamW)  # unchanged without the options
    assert "fo_optimizer" not in optimizer_options("hybrid_signadam") and "zo_momentum" in optimizer_options("hybrid")
