"""The memory model (zounlearn.memory) and `zounlearn memory`: the meta-device profile against what
autograd really saves on the CPU, the plans' state counts against the optimizers' own state, the
estimate's structure, and bad input. (Predicted against measured peaks: benchmarks/test_memory_bench.py.)"""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from zounlearn.cli import main
from zounlearn.errors import UsageError
from zounlearn.memory import Plan, estimate, load_config, plan, profile
from zounlearn.memory.profile import PROFILE_TOKENS

TINY = {
    "gpt2": GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=300, n_positions=128),
    "llama": LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=128),
}


def _really_saved(config, dtype: torch.dtype, tokens: int) -> tuple[int, int]:
    """(parameters, bytes of the distinct non-parameter storages autograd saves) of a real CPU forward."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved.setdefault(s.data_ptr(), s.nbytes())
        return t

    ids = torch.randint(0, config.vocab_size, (2, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)
    return sum(p.numel() for p in model.parameters()), sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("arch", list(TINY))
def test_profile_counts_what_autograd_saves(arch, dtype):
    config = TINY[arch]
    prof = profile(config, dtype, arch)
    params, saved = _really_saved(config, dtype, 2 * PROFILE_TOKENS)  # another batch and length than the trace's
    assert prof.params == params
    predicted = 2 * 2 * PROFILE_TOKENS * (prof.layers * prof.layer_saved + prof.other_saved)
    assert predicted == pytest.approx(saved, rel=0.08), (predicted, saved)


def test_sizes_have_their_published_parameter_counts():
    counts = {"gpt2": 124_439_808, "7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}
    for name, count in counts.items():
        assert profile(load_config(name), torch.bfloat16, name).params == count, name


def test_a_config_directory_and_bad_names(tmp_path):
    TINY["gpt2"].save_pretrained(tmp_path)
    assert load_config(str(tmp_path)).n_embd == 64
    with pytest.raises(UsageError, match="cannot read a model config.*a size: gpt2"):
        load_config(str(tmp_path / "missing"))


# zounlearn's state in bytes per parameter as stored (float32 4 per value, bfloat16 2, int8 a byte
# and a float32 absmax per 256); torch.optim's in elements (the parameters' dtype).
INT8 = 1 + 4 / 256


@pytest.mark.parametrize("name, options, state_bytes, param_state, in_backward", [
    ("adamw", {}, 0, 2, False),  # torch.optim.AdamW: m and v in the parameters' dtype
    ("adamw", {"in_backward": True}, 8, 0, True),
    ("adamw", {"in_backward": True, "state_dtype": "bfloat16"}, 4, 0, True),
    ("adamw", {"state_dtype": "int8"}, 2 * INT8, 0, False),
    ("sgd", {}, 0, 0, False),
    ("sgd", {"momentum": 0.9}, 0, 1, False),
    ("signadam", {}, 4, 0, False),
    ("sophia", {"in_backward": True}, 8, 0, True),
    ("zo_sgd", {}, 0, 0, False),
    ("adazo", {}, 8, 0, False),
    ("adazo", {"state_dtype": "int8"}, 2 * INT8, 0, False),
    ("hybrid", {}, 8, 0, True),  # AdamW's and AdaZO's m and v in bfloat16
    ("hybrid_float32", {}, 8, 2, False),
    ("hybrid_adam_shared", {}, 4, 0, True),  # one bfloat16 m and v
    ("hybrid_signadam", {}, 2, 0, True),
    ("hybrid_signadam_shared", {}, 4, 0, True),
    ("hybrid_signsgd", {}, 0, 0, True),
])
def test_plans_count_the_optimizers_own_state(name, options, state_bytes, param_state, in_backward):
    p = plan(name, **options)
    assert (p.state_bytes, p.param_state, p.in_backward) == (state_bytes, param_state, in_backward)
    assert p.update_scratch == (8 if options.get("state_dtype") == "int8" else 0)  # float32 m and v of one tensor
    assert p.first_order == (not name.startswith("zo_") and name != "adazo")
    assert p.zeroth_order == (name.startswith(("zo_", "hybrid")) or name == "adazo")


def _estimate(name, **kw):
    prof = profile(load_config("gpt2"), torch.float32, "gpt2")
    return estimate(prof, plan(name) if isinstance(name, str) else name, **{"batch": 2, "length": 256, **kw})


def test_estimate_components_add_up_and_follow_the_options():
    prof = profile(load_config("gpt2"), torch.float32, "gpt2")
    inference = _estimate(Plan("inference", 0.0, False, False))
    assert inference.components["weights"] == prof.params * 4 and inference.components["gradients"] == 0
    adamw = _estimate(plan("adamw", in_backward=True))
    assert adamw.peak == sum(adamw.components.values()) and adamw.components["state"] == prof.params * 8
    lean = _estimate(plan("adamw", in_backward=True, state_dtype="bfloat16"))
    assert lean.components["state"] == prof.params * 4
    assert _estimate(plan("adamw", state_dtype="int8")).components["state"] == round(prof.params * 2 * INT8)
    checkpointed = _estimate(plan("adamw", in_backward=True), checkpointing=True)
    assert checkpointed.components["activations"] < adamw.components["activations"]
    normal = _estimate("adamw", device="cuda")  # torch's, with foreach scratch
    assert normal.peak >= _estimate("adamw", device="cpu").peak
    paper = _estimate("hybrid_float32")
    assert paper.components["state"] == prof.params * 16 and paper.peak > adamw.peak
    assert _estimate("hybrid").components["state"] == prof.params * 8
    for lean in ("hybrid_signadam", "hybrid_signadam_shared", "hybrid_signsgd"):
        assert _estimate(lean).peak < adamw.peak
    with pytest.raises(UsageError, match="batch and length must be at least 1"):
        _estimate("adamw", batch=0)


def test_gradients_inside_backward_are_one_tensor_and_the_tied_head():
    prof = profile(load_config("7b"), torch.bfloat16, "7b")  # untied: the largest tensor is the head's
    long = dict(batch=1, length=128)  # few tokens: the gradients, not the activations, set the peak
    normal = estimate(prof, plan("signsgd"), **long)
    inside = estimate(prof, plan("signsgd", in_backward=True), **long)
    assert normal.at.startswith(("optimizer step", "backward, bottom"))
    assert normal.components["gradients"] == prof.params * 2
    assert inside.components["gradients"] <= prof.largest_params * 2 and inside.peak < normal.peak


def test_int8_state_updates_through_one_tensors_float32_moments():
    prof = profile(load_config("7b"), torch.bfloat16, "7b")
    int8 = estimate(prof, plan("adamw", state_dtype="int8"), batch=1, length=8)  # the fused twin, normal path
    assert int8.at == "optimizer step"
    assert int8.components == {"weights": prof.params * 2, "gradients": prof.params * 2, "activations": 0,
                               "state": round(prof.params * 2 * INT8), "scratch": 8 * prof.largest_params}


def test_memory_command_state_dtype(capsys):
    assert main(["memory", "--model", "gpt2", "--optimizer", "adazo,hybrid,hybrid_adam_shared", "--state-dtype", "int8",
                 "--json"]) == 0
    rows = {r["optimizer"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["adazo"]["state_bytes_per_parameter"] == 2 * INT8
    assert rows["hybrid"]["state_bytes_per_parameter"] == 4 * INT8  # both phases' m and v: its defaults give way
    assert rows["hybrid_adam_shared"]["state_bytes_per_parameter"] == 4  # the preset fixes bfloat16
    assert main(["memory", "--model", "gpt2", "--state-dtype", "int8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "sgd" in out["left_out"] and "adamw" not in out["left_out"]
    assert {"adamw", "signadam", "zo_adam"} <= {r["optimizer"] for r in out["rows"]}
    assert main(["memory", "--model", "gpt2", "--optimizer", "sgd", "--state-dtype", "int8"]) == 2
    assert "SGD takes no state_dtype='int8'" in capsys.readouterr().err


def test_memory_command_prints_the_table_and_json(capsys):
    assert main(["memory", "--model", "gpt2", "--optimizer", "inference,hybrid_signadam,adamw+in_backward",
                 "--gpu", "1,100"]) == 0
    out = capsys.readouterr().out
    assert "hybrid_signadam" in out and "adamw+in_backward" in out and "peak at" in out
    assert main(["memory", "--model", "7b", "--optimizer", "hybrid,zo_sgd", "--json", "--gpu", "24,141"]) == 0
    rows = {r["optimizer"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["zo_sgd"]["fits_gb"] == [24, 141] and rows["hybrid"]["fits_gb"] == [141]
    assert rows["hybrid"]["peak_bytes"] == sum(rows["hybrid"][c] for c in
                                               ("weights", "gradients", "state", "activations", "scratch"))


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "adma"], "unknown optimizer 'adma'"),
    (["--optimizer", "adamw+fast"], "the only suffix is \\+in_backward"),
    (["--optimizer", "signsgd", "--optimizer-option", "update_clip=1"], "SignSGD takes no update_clip"),
    (["--batch", "0"], "--batch and --length must be at least 1"),
    (["--gpu", "0"], "--gpu sizes must be positive"),
    (["--model", "/no/such/model"], "cannot read a model config"),
])
def test_memory_command_bad_input(capsys, argv, message):
    assert main(["memory", "--model", "gpt2", *argv]) == 2  # a second --model wins
    assert re.search(message, capsys.readouterr().err)
