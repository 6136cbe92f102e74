"""Models for the unlearning loop: any Hugging Face causal LM, and the embedded default.

`load_model` loads a causal LM from a directory or a hub name in float32, bfloat16 or
float16 on any device, and fails with a one-line `ModelError` that says how to fix the
problem. A tokenizer without a pad token gets its eos token as pad (GPT-2, Llama and
most causal LMs have none; padded positions are masked, so which token pads does not
matter).

`embedded_model` is the offline default: a small GPT-2 built from a config, with the
word-level tokenizer of `zounlearn.unlearning.tokenizer`, trained from a seed on the
synthetic people of the forget and retain splits (their sentences and their question/
answer pairs; the holdout people never) until greedy generation answers at least
`target_accuracy` of the forget and of the retain questions exactly. A question is
shown as "{prompt} {answer}" followed by eos, the loss on the answer and eos only.
The result is cached in `<cache>/models/<name>-<hash>/` (cache: $ZOUNLEARN_CACHE, else
$XDG_CACHE_HOME/zounlearn, else ~/.cache/zounlearn); the hash covers the config, the
seed, the data and BUILD_VERSION.

`retrain_model` is its gold standard, TOFU's "retain model": the same initialisation (the
seed's GPT-2) and recipe (AdamW, learning rate, batches, evaluation cadence), trained on
the retain people alone until it answers `target_accuracy` of their questions, and cached
beside it (`<name>-retrain-<hash>/`). It never saw the forget people, so it is what a
perfectly unlearned model would look like. `embedded_model` registers it as the retain
model of its data (`evaluation.register_retain_model`), built on first use, so that
`evaluate` reports forget_quality and privleak for the embedded data without being told.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..errors import ZounlearnError
from .data import HUB_NAME, Example, UnlearningData, one_line
from .evaluation import register_retain_model
from .synthetic import synthetic_data
from .tokenizer import build_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Bump when the tokenizer, the training recipe or the question format changes: old caches are then unused.
BUILD_VERSION = 2  # 2: questions carry paraphrased and perturbed answers, whose words the tokenizer gained
SUMMARY = "training.json"  # written last into the build directory: its presence marks a complete model
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelError(ZounlearnError, ValueError):
    """A model that cannot be loaded or built; the message is one line: what is wrong and how to fix it."""


# ---------------------------------------------------------------------------------------
# Any Hugging Face causal LM


def load_model(name_or_path: str | os.PathLike, *, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a directory or a hub name, in eval mode on `device`."""
    torch_dtype = _dtype(dtype)
    target = _device(device)
    _check_runs(torch_dtype, target)
    source, local_only = _locate(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        # Quiet: transformers prints a table of missing or mismatched weights, which _check_loaded reports in a line.
        with _transformers_errors_only():
            model, loading = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype,
                                                                  local_files_only=local_only, output_loading_info=True)
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # unreadable, foreign or corrupt models
        raise ModelError(f"could not load {name_or_path} as a causal language model "
                         f"({one_line(f'{type(e).__name__}: {e}', 300)}); give a causal LM such as GPT-2 or "
                         f"Llama saved with save_pretrained") from None
    except RuntimeError as e:
        if "mismatched_sizes" not in str(e):  # not transformers' size-mismatch error: not ours to explain
            raise
        raise ModelError(f"{name_or_path} does not match its config.json: its weights have other shapes than the "
                         f"config describes; save the model and its config together with save_pretrained") from None
    _check_loaded(name_or_path, loading)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"the tokenizer of {name_or_path} has neither a pad nor an eos token; "
                             f"save it with one (tokenizer.pad_token = ...; tokenizer.save_pretrained(DIR))")
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(target).eval(), tokenizer


@contextlib.contextmanager
def _transformers_errors_only() -> Iterator[None]:
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)


def _check_loaded(name_or_path: str | os.PathLike, loading: dict) -> None:
    """Refuse a model whose weights file and config disagree: transformers would initialise the missing
    weights at random (or drop the extra ones) and carry on."""
    problems = {"has no weights for": loading.get("missing_keys"), "has weights its config has no place for":
                loading.get("unexpected_keys"), "has weights of other shapes for": loading.get("mismatched_keys")}
    for what, keys in problems.items():
        if keys:
            names = sorted(k if isinstance(k, str) else k[0] for k in keys)
            raise ModelError(f"{name_or_path} does not match its config.json: it {what} {len(names)} parameter(s) "
                             f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); save the model and its "
                             f"config together with save_pretrained")


def place_model(model: PreTrainedModel, *, dtype: str | torch.dtype = "float32",
                device: str | torch.device = "cpu") -> PreTrainedModel:
    """model in `dtype` on `device`, or a ModelError when the pair cannot run here."""
    torch_dtype, target = _dtype(dtype), _device(device)
    _check_runs(torch_dtype, target)
    return model.to(device=target, dtype=torch_dtype)


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    for name, value in DTYPES.items():
        if dtype in (name, value):
            return value
    raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def _device(device: str | torch.device) -> torch.device:
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelError(f"device {device!r} is not available: this torch sees no CUDA GPU "
                             f"(a CPU build of torch or no GPU); use device 'cpu'")
        if target.index is not None and target.index >= count:
            raise ModelError(f"device {device!r} does not exist: this machine has {count} CUDA GPU(s); "
                             f"use cuda:0 to cuda:{count - 1}")
    return target


def _check_runs(dtype: torch.dtype, device: torch.device) -> None:
    """A tiny matmul: some torch builds cannot multiply float16 (or bfloat16) on some devices."""
    name = next(n for n, d in DTYPES.items() if d == dtype)
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device)
        torch.matmul(a, a).sum().item()
    except Exception as e:  # the backends raise RuntimeError, NotImplementedError, AssertionError, ...
        raise ModelError(f"dtype {name} cannot run on {device} with torch {torch.__version__} "
                         f"({one_line(str(e), 160)}); use dtype float32") from None


def _locate(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """(what to hand to from_pretrained, whether to stay offline), or a ModelError that says what is missing."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path} is a file, not a model directory; pass the directory that holds config.json")
        missing = [what for what, files in (("config.json", ("config.json",)),
                                           ("weights (model.safetensors or pytorch_model.bin)", WEIGHTS),
                                           ("tokenizer files (tokenizer.json or tokenizer_config.json)",
                                            TOKENIZER_FILES))
                   if not any((path / f).is_file() for f in files)]
        if missing:
            raise ModelError(f"{path} is not a model directory: it has no {' and no '.join(missing)}; pass a "
                             f"directory written by model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR)")
        return str(path), True
    name = str(name_or_path)
    if not HUB_NAME.fullmatch(name):
        raise ModelError(f"{name}: no such directory; give a model directory (with config.json) or a hub name "
                         f"such as openai-community/gpt2")
    from huggingface_hub import try_to_load_from_cache
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name, True  # in the local Hugging Face cache: no network needed
    if not _hub_reachable():
        raise ModelError(f"{name} is neither a local directory nor in the Hugging Face cache, and the hub cannot "
                         f"be reached (offline); on a machine with network run `hf download {name} --local-dir "
                         f"DIR`, copy DIR here and pass its path")
    return name, False


def _hub_reachable() -> bool:
    """Whether a download can start; answers in seconds, so an offline machine never hangs on the hub."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------------------
# The embedded default


@dataclass(frozen=True)
class EmbeddedConfig:
    """The data, the GPT-2 and the training of an embedded model; every field enters the cache hash."""

    name: str = "zounlearn-gpt2"
    n_people: int = 100
    forget_fraction: float = 0.1
    n_holdout: int | None = None
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_positions: int = 64
    lr: float = 3e-3
    batch_size: int = 64
    max_steps: int = 3000
    eval_every: int = 100
    target_accuracy: float = 0.9


def default_cache_dir() -> Path:
    """Where embedded models are cached: $ZOUNLEARN_CACHE/models, else ~/.cache/zounlearn/models."""
    root = os.environ.get("ZOUNLEARN_CACHE") or \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zounlearn"
    return Path(root).expanduser() / "models"


def embedded_model_dir(seed: int = 0, *, config: EmbeddedConfig = EmbeddedConfig(),
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory of an embedded model (it may not exist yet)."""
    return _model_dir(seed, config, _data(seed, config), cache_dir)


def retrain_model_dir(seed: int = 0, *, config: EmbeddedConfig = EmbeddedConfig(),
                      cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory of an embedded model's retrain model (it may not exist yet)."""
    return _model_dir(seed, config, _data(seed, config), cache_dir, retrain=True)


def _model_dir(seed: int, config: EmbeddedConfig, data: UnlearningData, cache_dir: str | os.PathLike | None,
               retrain: bool = False) -> Path:
    fields = {"version": BUILD_VERSION, "seed": seed, "config": dataclasses.asdict(config),
              "data": hashlib.sha256(repr(data).encode()).hexdigest()}
    key = json.dumps({**fields, "retrain": True} if retrain else fields, sort_keys=True)
    parent = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return parent / f"{config.name}{'-retrain' if retrain else ''}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def embedded_model(seed: int = 0, *, config: EmbeddedConfig = EmbeddedConfig(),
                   cache_dir: str | os.PathLike | None = None, rebuild: bool = False, threads: int | None = 1
                   ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, UnlearningData]:
    """The embedded model (float32, CPU, eval mode), its tokenizer and the data it was trained on.

    Loads it from the cache, or builds it there first (rebuild=True: always). A build runs
    on `threads` CPU threads (None: torch's setting): the weights depend on the thread
    count, and this model is too small to gain from more than one. The training summary
    is `SUMMARY` in `embedded_model_dir(seed, config=config, cache_dir=cache_dir)`.
    """
    data = _data(seed, config)
    model, tokenizer = _cached(seed, config, data, cache_dir, rebuild, threads, retrain=False)
    register_retain_model(data, lambda: _cached(seed, config, data, cache_dir, False, threads, retrain=True)[0])
    return model, tokenizer, data


def retrain_model(seed: int = 0, *, config: EmbeddedConfig = EmbeddedConfig(),
                  cache_dir: str | os.PathLike | None = None, rebuild: bool = False, threads: int | None = 1
                  ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The retrain model of `embedded_model(seed, config=config)` (module docstring), from the cache or built
    there first; same arguments and training summary as embedded_model (`retrain_model_dir`)."""
    return _cached(seed, config, _data(seed, config), cache_dir, rebuild, threads, retrain=True)


def _cached(seed: int, config: EmbeddedConfig, data: UnlearningData, cache_dir: str | os.PathLike | None,
            rebuild: bool, threads: int | None, *, retrain: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    final = _model_dir(seed, config, data, cache_dir, retrain)
    if rebuild or not (final / SUMMARY).is_file():
        _build(final, seed, config, data, threads, retrain)
    try:
        return load_model(final)
    except ModelError as e:
        raise ModelError(f"the cached {'retrain' if retrain else 'embedded'} model is unreadable ({e}); delete "
                         f"{final} or pass rebuild=True") from None


def _data(seed: int, config: EmbeddedConfig) -> UnlearningData:
    return synthetic_data(seed, config.n_people, config.forget_fraction, config.n_holdout)


def _build(final: Path, seed: int, config: EmbeddedConfig, data: UnlearningData, threads: int | None,
           retrain: bool = False) -> None:
    """Train into a temporary sibling directory and rename it: a crash never leaves `final` half written."""
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    previous_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        tokenizer = build_tokenizer()
        with torch.random.fork_rng(devices=[]):  # seeding must not change the caller's random stream
            model, summary = _train(seed, config, data, tokenizer, retrain)
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        summary.update(seed=seed, config=dataclasses.asdict(config), version=BUILD_VERSION, retrain=retrain,
                       threads=threads
                       or previous_threads, torch=torch.__version__, qa_format="{prompt} {answer}<eos>")
        (work / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        if final.exists():  # an incomplete directory, or rebuild: move it aside first (rename fails onto it)
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
            os.replace(final, old / "model")
            shutil.rmtree(old)
        try:
            os.replace(work, final)
        except OSError:
            if not (final / SUMMARY).is_file():
                raise  # else another process finished the same build first: use theirs
    finally:
        torch.set_num_threads(previous_threads)
        shutil.rmtree(work, ignore_errors=True)


def _train(seed: int, config: EmbeddedConfig, data: UnlearningData, tokenizer: PreTrainedTokenizerBase,
           retrain: bool = False) -> tuple[PreTrainedModel, dict]:
    """AdamW on the forget and retain examples until both QA accuracies reach the target; retrain: on the retain
    examples alone, until their QA accuracy does (the forget accuracy is recorded, not required)."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=config.n_positions, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # memorising: no dropout
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    model.loss_type = "ForCausalLM"  # transformers warns when a model names no loss
    trained = (data.retain,) if retrain else (data.forget, data.retain)
    examples = [e for split in trained for e in (*split.train, *split.qa)]
    ids, labels = _collate(tokenizer, examples)
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    start, step, accuracy = time.perf_counter(), 0, {}
    while step < config.max_steps:
        for batch in torch.randperm(len(ids), generator=order).split(config.batch_size):
            model.train()
            loss = model(input_ids=ids[batch], attention_mask=ids[batch] != tokenizer.pad_token_id,
                         labels=labels[batch]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % config.eval_every and step < config.max_steps:
                continue
            accuracy = {s.name: _qa_accuracy(model, tokenizer, s.qa) for s in (data.forget, data.retain)}
            if min(accuracy[s.name] for s in trained) >= config.target_accuracy:
                return model.eval(), {"steps": step, "seconds": round(time.perf_counter() - start, 1),
                                      "loss": loss.item(), "accuracy": accuracy}
            if step == config.max_steps:
                break
    raise ModelError(f"the {'retrain' if retrain else 'embedded'} model did not reach {config.target_accuracy:.0%} "
                     f"question accuracy in {config.max_steps} steps (forget {accuracy.get('forget', 0):.0%}, retain "
                     f"{accuracy.get('retain', 0):.0%}); raise max_steps, lr or the model size in EmbeddedConfig")


def _collate(tokenizer: PreTrainedTokenizerBase, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 off the answer): "{prompt} {answer}<eos>", or "{text}<eos>".

    Private to the embedded build; the loop's own batching lives elsewhere.
    """
    rows = []
    for e in examples:
        prompt = tokenizer(e.prompt)["input_ids"] if e.prompt else []
        answer = tokenizer(" " + e.answer if e.prompt else e.answer)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(r) for r, _ in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    return ids, labels


@torch.no_grad()
def _qa_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: tuple[Example, ...]
                 ) -> float:
    """Exact-match accuracy of greedy answers, up to eos; prompts of one length run as one batch, unpadded."""
    if not questions:
        return 1.0
    model.eval()
    groups: dict[int, list[tuple[list[int], str]]] = {}
    for q in questions:
        prompt = tokenizer(q.prompt)["input_ids"]
        groups.setdefault(len(prompt), []).append((prompt, q.answer))
    correct = 0
    for group in groups.values():
        ids = torch.tensor([p for p, _ in group])
        # One token more than the longest answer: a right answer must be followed by eos.
        for _ in range(max(len(tokenizer(" " + a)["input_ids"]) for _, a in group) + 1):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        for row, (prompt, answer) in zip(ids.tolist(), group):
            generated = row[len(prompt):]
            if tokenizer.eos_token_id in generated:
                generated = generated[:generated.index(tokenizer.eos_token_id)]
            correct += tokenizer.decode(generated).strip() == answer
    return correct / len(questions)
