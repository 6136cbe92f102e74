"""What the subcommands share: model and data flags, the config file, KEY=VALUE options, and
the checks every command makes before it loads a model or writes anything.

Options default to "not given" (argparse.SUPPRESS), so that a command can tell a flag from
a config-file value from a built-in default: flags win over the config file, which wins
over the defaults; a KEY=VALUE option mapping from the file and the flag's KEY=VALUE pairs
are merged, key by key. Values from a config file are checked for their type (a boolean is
true or false, a path is text) before anything runs; numbers are checked where they are
used (LoopConfig, the attacks' options), by the library's own checks. A data source is a
file, a directory or a hub name, optionally followed by #CONFIG and @SPLIT
(`locuslab/TOFU#forget10@train`); a flag may be repeated to join several sources into one
split (texts to train on and 4-choice questions to ask, say).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checks import check_bool, check_int
from ..errors import UsageError

GIVEN = argparse.SUPPRESS
EMBEDDED = "embedded"
ROLES = ("forget", "retain", "holdout")
# The types of the options that are not numbers, for values from a config file.
BOOLEAN = ("resume", "save_model", "progress", "train_mode", "rebuild")
TEXT = ("model", "original", "output", "plot", "dtype", "device", "text_unit", "objective", "optimizer", "backend")
KEY_VALUE = {"objective_option": "--objective-option", "optimizer_option": "--optimizer-option"}
# What only a --forget source gives meaning to: without one, the embedded model's own data is used.
DATA_FLAGS = ("retain", "holdout", "fields", "text_unit")


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
    """Built-in defaults, overridden by the config file, overridden by the flags given; type-checked."""
    given = {k: v for k, v in vars(args).items() if k in defaults}
    from_file = read_config(args.config, defaults) if hasattr(args, "config") else {}
    options = {**defaults, **from_file, **given}
    for key, flag in KEY_VALUE.items():
        if key in from_file and key in given:  # the file's mapping and the flags' pairs, the flags winning
            options[key] = {**key_values(from_file[key], flag), **key_values(given[key], flag)}
    check_types(options)
    return options


def check_types(options: Mapping[str, Any]) -> None:
    """The non-numeric options have the types they must (a config file can hold anything)."""
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if key in BOOLEAN:
            check_bool(flag, value)
        elif key in TEXT and value is not None and not isinstance(value, str):
            raise UsageError(f"{flag} must be text (a name or a path), got {value!r}")
        elif key in ROLES and value is not None and \
                (not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)):
            raise UsageError(f"{flag} must be a data source (a path or a hub name) or a list of them, got {value!r}")


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
    for role in ROLES:
        if isinstance(values.get(role), str):
            values[role] = [values[role]]
    return values


def key_values(items: list[str] | dict[str, Any] | None, flag: str) -> dict[str, Any]:
    """KEY=VALUE strings (or a config file's mapping) to a dict; values parse as JSON when they can (1e-3, true,
    [0.9, 0.99]) and stay strings otherwise."""
    if items is None:
        return {}
    if isinstance(items, dict):
        if not all(isinstance(key, str) and key for key in items):
            raise UsageError(f"{flag}: a config file's mapping needs option names as keys, got {items!r}")
        return {key.replace("-", "_"): value for key, value in items.items()}
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise UsageError(f"{flag} takes KEY=VALUE pairs (in a config file: a mapping), got {items!r}")
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
    if text is None:
        return None
    if isinstance(text, dict):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in text.items()):
            raise UsageError(f"--fields: a config file's mapping must map names to names, got {text!r}")
        return text
    if not isinstance(text, str):
        raise UsageError(f"--fields takes OURS=THEIRS pairs separated by commas, got {text!r}")
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
        check_int("--threads", threads, 1)
        torch.set_num_threads(threads)


def check_writable(path: str | os.PathLike, flag: str, *, directory: bool = False) -> None:
    """A file (or, with directory, a directory) can be written at path: checked before any work, by creating
    and deleting a temporary file where it would go (permissions alone do not say so for root)."""
    target = Path(path)
    want = "directory" if directory else "file name"
    if target.exists() and target.is_dir() != directory:
        raise UsageError(f"{flag} {path} is a {'file' if directory else 'directory'}; give a {want}")
    place = target if directory and target.exists() else target.parent
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise UsageError(f"{flag} {path} cannot be created: {place} is a file, not a directory; give another {want}")
    try:
        with tempfile.TemporaryFile(dir=place):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path} cannot be written ({e.strerror or e} in {place}); give another {want}") \
            from None


def check_data_flags(options: Mapping[str, Any]) -> None:
    """Data flags that would be ignored are errors: without --forget, only the embedded model has data."""
    if options.get("forget"):
        return
    if options["model"] != EMBEDDED:
        raise UsageError("no data given; pass --forget SOURCE (and --retain SOURCE) for a model that is not the "
                         "embedded one")
    for key in DATA_FLAGS:
        if options.get(key):
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} is used only with --forget: without --forget the embedded model's own forget, "
                             f"retain and holdout sets are used; add --forget SOURCE, or drop {flag}")


def load_model_and_data(options: Mapping[str, Any], *, progress: bool = True) -> tuple[Any, Any, Any, dict]:
    """(model, tokenizer, data, meta) from the model and data options; meta describes them for the record.
    The data is read before the model is loaded, so that bad data fails first."""
    from transformers.utils import logging as transformers_logging

    from ..unlearning import UnlearningData
    from ..unlearning.data import Split

    transformers_logging.disable_progress_bar()  # its weight-loading bars would bury ours

    name = options["model"]
    if name is None:
        raise UsageError("no model given; pass --model DIR_OR_HUB_NAME, or --model embedded")
    check_data_flags(options)
    set_threads(options.get("threads"), name == EMBEDDED)
    device = options.get("device") or default_device()
    data = None
    if options.get("forget"):
        fields, unit = parse_fields(options.get("fields")), options.get("text_unit") or "line"
        splits = {role: Split.from_examples(role, _examples(options.get(role) or (), fields, unit))
                  for role in ROLES}
        data = UnlearningData(splits["forget"], splits["retain"],
                              splits["holdout"] if options.get("holdout") else None)
    model, tokenizer, embedded_data = load_named_model(name, options, progress=progress)
    data = data or embedded_data
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
