"""Models: the embedded tokenizer (exact round trip, reload), the embedded model (accuracy bar on a
small configuration, cache reuse, atomic build, determinism, the step cap), its retrain model (the
same initialisation and recipe without the forget people, cached beside it, registered as the
retain model of its data) and `load_model`'s loading and bad-input cases on a tiny model saved to
tmp_path."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from tiny import SMALL_EMBEDDED as SMALL
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from zounlearn.unlearning import model as model_module
from zounlearn.unlearning import synthetic_data
from zounlearn.unlearning.model import (
    SUMMARY,
    ModelError,
    default_cache_dir,
    embedded_model,
    embedded_model_dir,
    load_model,
    retrain_model,
    retrain_model_dir,
)
from zounlearn.unlearning.tokenizer import build_tokenizer

# Stops at its first evaluation: for what needs a build but not a trained model.
INSTANT = dataclasses.replace(SMALL, name="test-instant", eval_every=5, target_accuracy=0.0)


@pytest.fixture(autouse=True)
def _no_real_cache(tmp_path_factory, monkeypatch):
    """Whatever a test forgets to pass, nothing is written to the real ~/.cache."""
    monkeypatch.setenv("ZOUNLEARN_CACHE", str(tmp_path_factory.mktemp("default-cache")))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cache = tmp_path_factory.mktemp("models")
    start = time.perf_counter()
    model, tokenizer, data = embedded_model(0, config=SMALL, cache_dir=cache)
    return cache, model, tokenizer, data, time.perf_counter() - start


def _accuracy(model, tokenizer, questions) -> float:
    """Exact match of greedy answers from HF generate, independent of the build's own evaluation."""
    by_length: dict[int, list] = {}
    for q in questions:  # prompts of one length batch without padding
        by_length.setdefault(len(tokenizer(q.prompt)["input_ids"]), []).append(q)
    eos, correct = tokenizer.eos_token_id, 0
    for group in by_length.values():
        ids = tokenizer([q.prompt for q in group], return_tensors="pt")["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        for q, row in zip(group, out[:, ids.shape[1]:].tolist()):
            correct += tokenizer.decode(row[:row.index(eos)] if eos in row else row).strip() == q.answer
    return correct / len(questions)


# --- the tokenizer


def test_tokenizer_round_trips_every_synthetic_string():
    tokenizer = build_tokenizer()
    data = synthetic_data(seed=3, n_people=400, n_holdout=100)
    texts = {t for split in (data.forget, data.retain, data.holdout) for e in (*split.train, *split.qa, *split.choice)
             for t in (e.prompt, e.answer, e.prompt + " " + e.answer, *e.choices) if t}
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids) == text
    assert tokenizer("Where was Adela Ashgrove born? Lisbon")["input_ids"] == \
        tokenizer("Where was Adela Ashgrove born?")["input_ids"] + tokenizer(" Lisbon")["input_ids"]


def test_tokenizer_special_tokens_and_unknown_words():
    tokenizer = build_tokenizer()
    assert len({tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}) == 3
    assert tokenizer("Lisbon")["input_ids"] != tokenizer(" Lisbon")["input_ids"]  # the space is kept
    assert tokenizer("Zanzibar 42!")["input_ids"][0] == tokenizer.unk_token_id
    assert tokenizer.decode(tokenizer("4 2!")["input_ids"]) == "4 2!"  # digits and punctuation one by one
    assert build_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_tokenizer_reloads_with_auto_tokenizer(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "The employer of Ysolde Zellmont is Granite Harbor Bank."
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.decode(reloaded(text)["input_ids"]) == text
    assert (reloaded.pad_token, reloaded.eos_token, reloaded.unk_token) == \
        (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token)


# --- the embedded model


def test_embedded_model_knows_the_facts(small):
    cache, model, tokenizer, data, seconds = small
    assert seconds < 60
    summary = json.loads((embedded_model_dir(0, config=SMALL, cache_dir=cache) / SUMMARY).read_text())
    assert summary["steps"] <= SMALL.max_steps and summary["steps"] % SMALL.eval_every == 0
    assert min(summary["accuracy"].values()) >= 0.9
    # The reloaded model, asked through HF generate, not the build's own evaluation.
    assert _accuracy(model, tokenizer, data.forget.qa) >= 0.9
    assert _accuracy(model, tokenizer, data.retain.qa) >= 0.9
    # Never trained on: its people's facts are guesses (chance is 1/12 to 1/50 a question).
    assert _accuracy(model, tokenizer, data.holdout.qa) < 0.5
    assert data == synthetic_data(0, SMALL.n_people, SMALL.forget_fraction, SMALL.n_holdout)
    assert not model.training and next(model.parameters()).dtype == torch.float32


@pytest.mark.slow
def test_default_embedded_model_knows_the_facts_in_time(tmp_path):
    """The demo's model: 100 people, trained in well under the demo's budget (about 30 s on 2 cores)."""
    start = time.perf_counter()
    model, tokenizer, data = embedded_model(0, cache_dir=tmp_path)
    assert time.perf_counter() - start < 180
    summary = json.loads((embedded_model_dir(0, cache_dir=tmp_path) / SUMMARY).read_text())
    assert min(summary["accuracy"].values()) >= 0.9
    assert _accuracy(model, tokenizer, data.forget.qa) >= 0.9


def test_second_call_loads_from_the_cache(small, monkeypatch):
    cache, model, *_ = small

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(model_module, "_train", no_training)
    again, _, _ = embedded_model(0, config=SMALL, cache_dir=cache)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(AssertionError, match="trained again"):
        embedded_model(0, config=SMALL, cache_dir=cache, rebuild=True)
    assert (embedded_model_dir(0, config=SMALL, cache_dir=cache) / SUMMARY).is_file()  # the old one survives


def test_same_seed_same_weights_other_seed_other_weights(small, tmp_path):
    _, model, *_ = small
    again, _, _ = embedded_model(0, config=SMALL, cache_dir=tmp_path / "again")
    assert model.state_dict().keys() == again.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    first, _, _ = embedded_model(0, config=INSTANT, cache_dir=tmp_path)
    other, _, data = embedded_model(1, config=INSTANT, cache_dir=tmp_path)
    assert not torch.equal(first.transformer.wte.weight, other.transformer.wte.weight)
    assert data != synthetic_data(0, INSTANT.n_people)


def test_retrain_model_never_saw_the_forget_people(small):
    cache, model, tokenizer, data, _ = small
    retrain, retrain_tokenizer = retrain_model(0, config=SMALL, cache_dir=cache)
    assert retrain_tokenizer.get_vocab() == tokenizer.get_vocab()
    summary = json.loads((retrain_model_dir(0, config=SMALL, cache_dir=cache) / SUMMARY).read_text())
    assert summary["retrain"] and summary["accuracy"]["retain"] >= 0.9
    assert _accuracy(retrain, tokenizer, data.retain.qa) >= 0.9
    # It answers the forget people's questions no better than the holdout's, which no model saw.
    assert _accuracy(retrain, tokenizer, data.forget.qa) < 0.5
    assert retrain_model_dir(0, config=SMALL, cache_dir=cache).name.startswith("test-gpt2-retrain-")
    assert retrain_model_dir(0, config=SMALL, cache_dir=cache).parent == cache


def test_retrain_model_starts_where_the_embedded_model_started(tmp_path, monkeypatch):
    """Same seed, same GPT-2, same initial weights; only the examples differ (retain people only)."""
    starts, sizes, real = [], [], torch.optim.AdamW

    def recording(params, **kwargs):
        params = list(params)
        starts.append([p.detach().clone() for p in params])
        return real(params, **kwargs)

    real_collate = model_module._collate
    monkeypatch.setattr(model_module.torch.optim, "AdamW", recording)
    monkeypatch.setattr(model_module, "_collate", lambda tok, examples: sizes.append(len(examples))
                        or real_collate(tok, examples))
    embedded_model(0, config=INSTANT, cache_dir=tmp_path)
    retrain_model(0, config=INSTANT, cache_dir=tmp_path)
    assert len(starts) == 2 and all(torch.equal(a, b) for a, b in zip(*starts))
    data = synthetic_data(0, INSTANT.n_people)
    assert sizes == [sum(len(s.train) + len(s.qa) for s in (data.forget, data.retain)),
                     len(data.retain.train) + len(data.retain.qa)]


def test_the_embedded_data_come_with_their_retain_model(tmp_path, monkeypatch):
    from zounlearn.unlearning.evaluation import evaluate

    built = []
    real = model_module._build
    monkeypatch.setattr(model_module, "_build", lambda *a, **k: built.append(a[-1]) or real(*a, **k))
    model, tokenizer, data = embedded_model(0, config=INSTANT, cache_dir=tmp_path)
    assert built == [False]  # the retrain model is built when a metric first needs it, not before
    metrics = evaluate(model, tokenizer, data, batch_size=64)
    assert built == [False, True] and "forget_quality" in metrics and "privleak" in metrics
    retrain, _ = retrain_model(0, config=INSTANT, cache_dir=tmp_path)
    assert metrics == evaluate(model, tokenizer, data, batch_size=64, retain_model=retrain)


def test_cache_directory_names_config_seed_and_data(tmp_path, monkeypatch):
    base = embedded_model_dir(0, config=SMALL, cache_dir=tmp_path)
    assert base.parent == tmp_path and base.name.startswith("test-gpt2-")
    assert embedded_model_dir(0, config=SMALL, cache_dir=tmp_path) == base
    assert embedded_model_dir(1, config=SMALL, cache_dir=tmp_path) != base
    assert embedded_model_dir(0, config=dataclasses.replace(SMALL, lr=1e-3), cache_dir=tmp_path) != base
    monkeypatch.setattr(model_module, "BUILD_VERSION", model_module.BUILD_VERSION + 1)
    assert embedded_model_dir(0, config=SMALL, cache_dir=tmp_path) != base
    monkeypatch.setenv("ZOUNLEARN_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere" / "models"
    assert embedded_model_dir(0, config=SMALL).parent == tmp_path / "elsewhere" / "models"


def test_build_interrupted_before_rename_leaves_nothing_complete(tmp_path, monkeypatch):
    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_module.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded_model(0, config=INSTANT, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    model, _, _ = embedded_model(0, config=INSTANT, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [embedded_model_dir(0, config=INSTANT, cache_dir=tmp_path).name]


def test_incomplete_directory_is_rebuilt(tmp_path):
    final = embedded_model_dir(0, config=INSTANT, cache_dir=tmp_path)
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # as a copy cut short would leave it: no summary
    embedded_model(0, config=INSTANT, cache_dir=tmp_path)
    assert (final / SUMMARY).is_file() and (final / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_build_leaves_the_callers_random_stream_and_threads_alone(tmp_path):
    torch.manual_seed(123)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    embedded_model(0, config=INSTANT, cache_dir=tmp_path, threads=threads + 1)
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads
    summary = json.loads((embedded_model_dir(0, config=INSTANT, cache_dir=tmp_path) / SUMMARY).read_text())
    assert summary["threads"] == threads + 1 and summary["steps"] == INSTANT.eval_every


def test_step_cap_without_the_bar_is_an_error(tmp_path):
    capped = dataclasses.replace(SMALL, name="test-capped", max_steps=3, eval_every=2)
    with pytest.raises(ModelError, match=r"did not reach 90% question accuracy in 3 steps"):
        embedded_model(0, config=capped, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- load_model


@pytest.fixture
def tiny_dir(tmp_path):
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2))
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


def test_load_model_loads_a_saved_causal_lm(tiny_dir):
    path, original = tiny_dir
    ids = torch.tensor([[5, 6, 7]])
    model, tokenizer = load_model(path)
    assert not model.training and tokenizer.pad_token == "<|pad|>"
    assert torch.equal(model(ids).logits, original.eval()(ids).logits)
    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16),
                               (torch.float32, torch.float32)):
        model, _ = load_model(str(path), dtype=dtype)
        assert next(model.parameters()).dtype == torch_dtype


def test_tokenizer_without_pad_gets_eos(tiny_dir):
    path, _ = tiny_dir
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    _, tokenizer = load_model(path)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"


def _one_line_error(match: str, *args, **kwargs) -> str:
    with pytest.raises(ModelError, match=match) as error:
        load_model(*args, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_directory_that_is_not_a_model(tmp_path, tiny_dir):
    path, _ = tiny_dir
    (tmp_path / "empty").mkdir()
    _one_line_error(r"is not a model directory: it has no config\.json and no weights", tmp_path / "empty")
    (path / "model.safetensors").unlink()
    _one_line_error(r"it has no weights \(model\.safetensors", path)
    _one_line_error(r"is a file, not a model directory", path / "config.json")
    _one_line_error(r"no such directory", tmp_path / "nowhere")
    _one_line_error(r"no such directory", "./models/nowhere")


def test_a_model_that_is_not_a_causal_lm(tiny_dir):
    path, _ = tiny_dir
    (path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    _one_line_error(r"could not load .* as a causal language model", path)


def test_hub_name_offline_fails_fast_with_a_local_copy_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    message = _one_line_error(r"neither a local directory nor in the Hugging Face cache",
                              "zounlearn-test/no-such-model")
    assert "hf download zounlearn-test/no-such-model --local-dir DIR" in message
    assert time.perf_counter() - start < 5


def test_hub_name_without_network_probe(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(model_module.socket, "create_connection",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("unreachable")))
    _one_line_error(r"cannot be reached \(offline\)", "zounlearn-test/no-such-model")


def test_bad_dtype_and_device(tiny_dir, monkeypatch):
    path, _ = tiny_dir
    _one_line_error(r"unknown dtype 'float8'; use one of float32, bfloat16, float16", path, dtype="float8")
    _one_line_error(r"unknown device 'gpu0'", path, device="gpu0")
    if not torch.cuda.is_available():
        _one_line_error(r"device 'cuda' is not available", path, device="cuda")
    real = torch.matmul

    def no_half(a, b):
        if a.dtype == torch.float16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
        return real(a, b)

    monkeypatch.setattr(torch, "matmul", no_half)  # a torch build without float16 matmul on this device
    _one_line_error(r"dtype float16 cannot run on cpu with torch .*not implemented for 'Half'.*use dtype float32",
                    path, dtype="float16")
    assert load_model(path, dtype="bfloat16")[0] is not None
