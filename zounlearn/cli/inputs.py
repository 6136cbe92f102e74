"""What the subcommands share: model and data flags, the config file, KEY=VALUE options.

Options default to "not given" (argparse.SUPPRESS), so that a command can tell a flag from
a config-file value from a built-in default: flags win over the config file, which wins
over the defaults. A data source is a file, a directory or a hub name, optionally followed
by #CONFIG and @SPLIT (`locuslab/TOFU#forget10@train`); a flag may be repeated to join
several sources into one split (texts to train on and 4-choice questions to ask, say).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

GIVEN = argparse.SUPPRESS
EMBEDDED = "embedded"


class UsageError(ValueError):
    """Bad command-line input; main() prints it on one line and exits with status 2."""


def add_model_flags(parser: argparse.ArgumentParser, *, model_help: str = "the model") -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=GIVEN, metavar="M",
                       help=f"{model_help}: a Hugging Face causal LM, a directory saved with save_pretrained or a hub "
                            f"name (offline: a copy in the local cache); '{EMBEDDED}' for the embedded default")
    group.add_argument("--dtype", default=GIVEN, choices=("float32", "bfloat16", "float16"),
                       help="the model's dtype (default: float32)")
    group.add_argument("--device", default=GIVEN, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    group.add_argument("--threads", default=GIVEN, type=int, metavar="N",
                       help="CPU threads for torch (default: 1 for the embedded model, which is too small to gain "
                            "from more and whose results depend on the count; torch's default otherwise)")


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "data", "SOURCE: a JSONL, JSON, CSV or text file, a directory, or a Hugging Face data set (local copy or "
                "hub name), optionally with #CONFIG and @SPLIT. Fields: text; or question + answer; or question + "
                "choices + answer (index or text). Without --forget the embedded model's synthetic data is used.")
    for role, what in (("forget", "what to unlearn"), ("retain", "what to keep"),
                       ("holdout", "never-seen data, for the membership-inference score (optional)")):
        group.add_argument(f"--{role}", action="append", default=GIVEN, metavar="SOURCE",
                           help=f"{what}; repeat to join sources")
    group.add_argument("--fields", default=GIVEN, metavar="OURS=THEIRS,...",
                       help="column names when they differ from text/question/answer/choices, e.g. "
                            "question=prompt,answer=gt (MUSE verbmem)")
    group.add_argument("--text-unit", default=GIVEN, choices=("line", "paragraph"),
                       help="what one example of a plain text file is (default: line)")


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=GIVEN, metavar="FILE",
                        help="a YAML or JSON file of option: value pairs with the names of these flags "
                             "(dashes or underscores); flags given on the command line win")


def merged(args: argparse.Namespace, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Built-in defaults, overridden by the config file, overridden by the flags given."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    from_file = read_config(args.config, defaults) if hasattr(args, "config") else {}
    return {**defaults, **from_file, **given}


def read_config(path: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file {path} does not exist; give the path of a YAML or JSON file")
    try:
        text = file.read_text()
        if file.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml
            values = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # yaml.YAMLError and JSONDecodeError are ValueErrors
        raise UsageError(f"cannot read config file {path}: {' '.join(str(e).split())[:200]}") from None
    except Exception as e:  # yaml's own error types
        raise UsageError(f"config file {path} is not valid YAML: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold a mapping of option: value pairs, got "
                         f"{type(values).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise UsageError(f"config file {path}: unknown option {', '.join(unknown)}; options: "
                         f"{', '.join(sorted(defaults))}")
    for role in ("forget", "retain", "holdout"):
        if isinstance(values.get(role), str):
            values[role] = [values[role]]
    return values


def key_values(items: list[str] | dict[str, Any] | None, flag: str) -> dict[str, Any]:
    """KEY=VALUE strings (or a config file's mapping) to a dict; values parse as JSON when they can (1e-3, true,
    [0.9, 0.99]) and stay strings otherwise."""
    if items is None:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            out[key.replace("-", "_")] = value
    return out


def parse_fields(text: str | dict | None) -> dict[str, str] | None:
    if text is None or isinstance(text, dict):
        return text
    fields = {}
    for pair in text.split(","):
        ours, sep, theirs = pair.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise UsageError(f"--fields takes OURS=THEIRS pairs separated by commas, got {text!r}")
        fields[ours.strip()] = theirs.strip()
    return fields


def parse_source(spec: str) -> tuple[str, str | None, str | None]:
    """SOURCE[#CONFIG][@SPLIT] -> (source, config, split); an existing path is taken whole."""
    if os.path.exists(spec):
        return spec, None, None
    source, _, split = spec.partition("@") if "@" in spec else (spec, "", "")
    source, _, config = source.partition("#")
    return source, config or None, split or None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def set_threads(threads: int | None, embedded: bool) -> None:
    if threads is None:
        threads = 1 if embedded else None
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise UsageError(f"--threads must be a positive integer, got {threads!r}")
        torch.set_num_threads(threads)


def load_model_and_data(options: Mapping[str, Any], *, progress: bool = True) -> tuple[Any, Any, Any, dict]:
    """(model, tokenizer, data, meta) from the model and data options; meta describes them for the record."""
    from transformers.utils import logging as transformers_logging

    from ..unlearning import UnlearningData
    from ..unlearning.data import Split

    transformers_logging.disable_progress_bar()  # its weight-loading bars would bury ours

    name = options["model"]
    if name is None:
        raise UsageError("no model given; pass --model DIR_OR_HUB_NAME, or --model embedded")
    set_threads(options.get("threads"), name == EMBEDDED)
    device = options.get("device") or default_device()
    model, tokenizer, data = load_named_model(name, options, progress=progress)
    if options.get("forget"):
        fields, unit = parse_fields(options.get("fields")), options.get("text_unit", "line")
        splits = {role: Split.from_examples(role, _examples(options.get(role) or (), fields, unit))
                  for role in ("forget", "retain", "holdout")}
        data = UnlearningData(splits["forget"], splits["retain"],
                              splits["holdout"] if options.get("holdout") else None)
    elif data is None:
        raise UsageError("no data given; pass --forget SOURCE (and --retain SOURCE) for a model that is not the "
                         "embedded one")
    meta = {"model": name, "dtype": str(options.get("dtype", "float32")), "device": device,
            "forget": options.get("forget") or "synthetic people (embedded)",
            "retain": options.get("retain") or ("synthetic people (embedded)" if not options.get("forget") else []),
            "holdout": options.get("holdout") or ("synthetic people (embedded)" if not options.get("forget") else [])}
    return model, tokenizer, data, meta


def load_named_model(name: str, options: Mapping[str, Any], *, progress: bool = True) -> tuple[Any, Any, Any]:
    """(model, tokenizer, data) for a model name or directory, with the options' dtype and device; data is the
    synthetic data set for the embedded model, None for any other."""
    from ..unlearning import load_model
    from ..unlearning.model import place_model

    dtype, device = options.get("dtype", "float32"), options.get("device") or default_device()
    if name == EMBEDDED:
        model, tokenizer, data = _embedded(options, progress)
        return place_model(model, dtype=dtype, device=device), tokenizer, data
    return (*load_model(name, dtype=dtype, device=device), None)


def _embedded(options: Mapping[str, Any], progress: bool) -> tuple[Any, Any, Any]:
    from ..unlearning import embedded_model, embedded_model_dir
    from ..unlearning.model import SUMMARY

    seed = options.get("model_seed", 0)
    if progress and not (embedded_model_dir(seed) / SUMMARY).is_file():
        print(f"building the embedded model (once; cached in {embedded_model_dir(seed).parent}) ...", flush=True)
    return embedded_model(seed, threads=options.get("threads") or 1)


def _examples(specs: list[str] | tuple[str, ...], fields: dict[str, str] | None, unit: str) -> list[Any]:
    from ..unlearning import load_examples

    examples: list[Any] = []
    for spec in specs:
        source, config, split = parse_source(spec)
        examples += load_examples(source, fields=fields, config=config, split=split, text_unit=unit)
    return examples


# --- option values


def as_int(value: Any) -> int:
    """An int (not a bool) or the text of one; TypeError or ValueError otherwise."""
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return int(value.strip())
    raise TypeError


def as_float(value: Any) -> float:
    """A finite number (not a bool) or the text of one, as a float; TypeError or ValueError otherwise."""
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        number = float(value.strip())
    else:
        raise TypeError
    if not math.isfinite(number):
        raise ValueError
    return number


def comma_list(value: Any, flag: str, convert: Callable[[Any], Any], what: str, example: str) -> list[Any]:
    """A comma-separated list (a flag, or a config file's string, list or single value) as a list."""
    if isinstance(value, str):
        items: Sequence[Any] = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        items = [value]
    problem = f"{flag} takes a comma-separated list of {what}, e.g. {example}; got {_shown(value)}"
    if not items or any(isinstance(item, str) and not item.strip() for item in items):
        raise UsageError(problem)
    try:
        return [convert(item) for item in items]
    except (TypeError, ValueError):
        raise UsageError(problem) from None


def _shown(value: Any) -> str:
    return repr(value if not isinstance(value, (list, tuple)) else ",".join(map(str, value)))
