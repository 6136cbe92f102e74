"""LoRA through peft (zounlearn.hf.lora): the --lora option's text, ZO, sign, Sophia and hybrid
optimizers on the adapters of a GPT-2 (our loop) and a Llama (the Trainer) leaving the base weights
bit-identical, adapters saved as peft saves them, the merged model, the attacks and diagnostics on
a LoRA-unlearned model, and the command line's --lora / --merge-lora."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from peft import PeftModel
from tiny import DATA, SMALL_EMBEDDED, data_flags, tiny_llama, tokenizer

from zounlearn.cli import main
from zounlearn.errors import UsageError
from zounlearn.hf import LoopBatches, Trainer, one_batch
from zounlearn.hf.lora import LoraSpec, apply_lora, merged, parse_lora, save_merged
from zounlearn.robustness import (
    mode_connectivity,
    noise_attack,
    quantization_attack,
    relearning_attack,
    weight_distance,
)
from zounlearn.unlearning import Split, UnlearningData, embedded_model, load_model
from zounlearn.unlearning.loop import LoopConfig, unlearn


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    torch.set_num_threads(1)
    return embedded_model(0, config=SMALL_EMBEDDED, cache_dir=tmp_path_factory.mktemp("models"))


def test_the_lora_option_text():
    assert parse_lora("r=8,alpha=16,target=c_attn,c_proj") == LoraSpec(8, 16.0, ("c_attn", "c_proj"))
    assert parse_lora("r=4") == LoraSpec(4, 16.0, None, 0.0)
    assert parse_lora("dropout=0.1, target=q_proj ,v_proj") == LoraSpec(target=("q_proj", "v_proj"), dropout=0.1)
    for text, message in (("r=0", "LoRA r must be an integer >= 1"), ("rank=8", "no key 'rank'"),
                          ("c_attn", "not KEY=VALUE"), ("r=8,r=4", "gives r twice"), ("r=x", "--lora 'r=x'"),
                          ("alpha=-1", "invalid LoRA alpha")):
        with pytest.raises(UsageError, match=message):
            parse_lora(text)


def _base(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}


def _adapters(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _assert_only_adapters_moved(model, base, adapters) -> None:
    after = model.get_base_model().state_dict()
    for key, value in base.items():
        assert torch.equal(after[key], value), key
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in adapters.items())


LOOP_RECIPES = {"adazo": {}, "signadam": {}, "sophia": {"update_period": 2}, "hybrid": {"block": 2}}


@pytest.mark.parametrize("name", list(LOOP_RECIPES))
def test_our_loop_on_lora_adapters_leaves_the_base_weights_bit_identical(small, tmp_path, name):
    model0, tok, data = small
    model = apply_lora(copy.deepcopy(model0), parse_lora("r=4,alpha=8,target=c_attn,c_proj"))
    base, adapters = _base(model), _adapters(model)
    config = LoopConfig(optimizer=name, lr=1e-3, steps=4, optimizer_options=LOOP_RECIPES[name])
    unlearn(model, tok, data, config, tmp_path / "run", progress=False, eval_data=_subset(data))
    _assert_only_adapters_moved(model, base, adapters)
    saved = tmp_path / "run" / "model"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in saved.iterdir()}
    assert not (saved / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(copy.deepcopy(model0), saved).eval()
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model.eval()(ids).logits)


@pytest.mark.parametrize("optimizer", ["adazo", "hybrid"])
def test_the_trainer_on_lora_adapters_of_a_llama(tmp_path, optimizer):
    model = apply_lora(tiny_llama(n_layer=2), parse_lora("r=4,alpha=8,target=q_proj,v_proj"))
    base, adapters = _base(model), _adapters(model)
    args = transformers.TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=1, max_grad_norm=0,
                                          report_to=[], remove_unused_columns=False, use_cpu=True, disable_tqdm=True,
                                          save_strategy="no", learning_rate=1e-2)
    trainer = Trainer(model, args, train_dataset=LoopBatches(DATA, tokenizer(), 4, with_retain=False),
                      data_collator=one_batch, optimizer_name=optimizer, optimizer_options={"block": 1}
                      if optimizer == "hybrid" else {})
    trainer.compute_loss = lambda m, inputs, return_outputs=False, num_items_in_batch=None: -m(**inputs["forget"]).loss
    trainer.train()
    _assert_only_adapters_moved(model, base, adapters)


def _subset(data: UnlearningData) -> UnlearningData:
    """A few examples of each split: the evaluations here only need to run."""
    return UnlearningData(*(Split(s.name, train=s.train[:4], qa=s.qa[:4], choice=s.choice[:4])
                            for s in (data.forget, data.retain)),
                          Split(data.holdout.name, train=data.holdout.train[:4], qa=data.holdout.qa[:4]))


def test_merged_model_attacks_and_diagnostics(small, tmp_path):
    model0, tok, data = small
    model = apply_lora(copy.deepcopy(model0), parse_lora("r=4,alpha=8,target=c_attn"))
    unlearn(model, tok, data, LoopConfig(optimizer="signadam", lr=1e-3, steps=3), progress=False,
            eval_data=_subset(data))
    adapters = _adapters(model)
    unlearned = merged(model)
    assert type(unlearned) is type(model0) and _adapters(model).keys() == adapters.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in adapters.items())  # merging copied
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(unlearned(ids).logits, model.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    distance = weight_distance(model0, unlearned)
    assert distance["total"] > 0 and distance["per_layer"]["other"] == 0.0  # only the blocks' c_attn moved
    few = _subset(data)
    assert set(quantization_attack(unlearned, tok, few, schemes=("nf4-g64", "bnb-fp4"))) == {"nf4-g64", "bnb-fp4"}
    assert 0.01 in noise_attack(unlearned, tok, few, relative_stds=(0.01,), draws=1)
    assert relearning_attack(unlearned, tok, few, k=2, steps=(0, 1))["steps"] == [0, 1]
    curve = mode_connectivity(model0, unlearned, tok, few, ts=(0.0, 0.5, 1.0))
    assert curve["t"] == [0.0, 0.5, 1.0]
    save_merged(model, tok, tmp_path / "merged")
    reloaded, _ = load_model(tmp_path / "merged")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), unlearned.state_dict().values()))


def test_command_line_lora_and_merged_model(small_files, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["unlearn", "--model", small_files["model"], *data_flags(small_files, ("forget", "retain")), "--no-progress",
            "--optimizer", "adazo", "--steps", "2"]
    assert main([*base, "--lora", "r=4,alpha=8,target=c_attn", "--merge-lora", "--output", str(run)]) == 0
    adapter = json.loads((run / "model" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and adapter["target_modules"] == ["c_attn"]
    assert (run / "merged" / "model.safetensors").is_file() and not (run / "model" / "model.safetensors").exists()
    assert json.loads((run / "config.json").read_text())["meta"]["lora"] == "r=4,alpha=8,target=c_attn"
    capsys.readouterr()
    for extra, message in ((["--merge-lora"], "--merge-lora needs --lora"),
                           (["--lora", "r=0"], "LoRA r must be an integer")):
        assert main([*base, *extra, "--output", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()
