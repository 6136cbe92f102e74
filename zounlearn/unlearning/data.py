"""The data layer of the unlearning loop: one representation for every source, and its loaders.

Representation
--------------
An `Example` is a prompt and the answer that follows it; the loss is taken on the
answer's tokens only.

- plain text:       Example(prompt="", answer=text)           kind "text"
- question/answer:  Example(prompt=question, answer=answer)   kind "qa"
- multiple choice:  Example(prompt=question, answer=choices[correct], choices=..., correct=i)   kind "choice"

`prompt` and `answer` are stored exactly as the source has them (never stripped, never
templated): how a question is shown to a model ("Question: ...\\nAnswer:", a chat template)
and how prompt and answer are joined is the loop's choice. MUSE's verbmem rows
(prompt/gt) are "qa" examples whose prompt is a text prefix and whose answer is its
continuation.

A `Split` (forget, retain or holdout) holds three tuples of examples:

- `train`:  what the objectives run on: texts and question/answer pairs;
- `qa`:     questions for generation (exact match, ROUGE-L);
- `choice`: multiple-choice questions, scored by the log-likelihood of each choice.

`Split.from_examples` sorts loaded examples into them: a question/answer pair goes to
both `train` and `qa` (as TOFU trains and evaluates on the same pairs), a
multiple-choice question only to `choice` (WMDP's questions are never trained on).
`UnlearningData` holds the forget, retain and optional holdout splits; the holdout
people or documents are never trained on (membership inference compares them with the
forget set). The built-in synthetic set is in `zounlearn.unlearning.synthetic`.

Sources (`load_examples`)
-------------------------
- `.jsonl` (one JSON object a line; blank lines skipped) and `.json` (a JSON array of
  objects, or JSON lines as TOFU's files are);
- `.csv` with a header row; a `choices` cell holds a JSON list (["a", "b", "c"]);
- `.txt`: one example a line (`text_unit="line"`, blank lines skipped) or one a
  blank-line-separated paragraph (`text_unit="paragraph"`, its line breaks kept);
- `.parquet`, a directory written by `datasets` `save_to_disk`, any other directory
  (handed to `datasets.load_dataset`, e.g. a git clone of a hub repository), or a hub
  name such as "locuslab/TOFU".

A directory is searched for CONFIG/SPLIT, CONFIG, SPLIT, then itself, each as a
`save_to_disk` directory or a file with one of the suffixes above, so a directory
holding `forget10.json`, `knowmem/forget_qa.jsonl` or the `save_to_disk` copy of a hub
data set all work; a saved copy that records another config is refused, and a config
that none of these holds is an error unless the directory has a README.md (a hub
clone, whose README names its configs).

Fields: `text`; or `question` + `answer`; or `question` + `choices` + `answer`, where
the answer of a multiple-choice row is an index into the choices (an int, or a string
of digits in CSV) or the text of one choice. `fields={"question": "prompt"}` reads a
field from another column name. Bad input raises `DataError` (a ValueError) with one
line that says what is wrong and how to fix it.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import ZounlearnError

FIELDS = ("text", "question", "answer", "choices")
SUFFIXES = (".jsonl", ".json", ".csv", ".txt", ".parquet")
MUSE_CONFIGS = {"raw": "text", "privleak": "text", "scal": "text", "sust": "text", "train": "text",
                "knowmem": "qa", "verbmem": "qa"}
# "owner/name" or "name": what the hub accepts, never a path with a file suffix.
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

Row = tuple[str, Mapping[str, Any]]  # (where the row is, for messages; the row)


class DataError(ZounlearnError, ValueError):
    """Bad data or a bad data source; the message is one line: what is wrong and how to fix it."""


@dataclass(frozen=True)
class Example:
    """A prompt and its answer, the part whose tokens carry the loss (see the module docstring)."""

    prompt: str
    answer: str
    choices: tuple[str, ...] = ()
    correct: int | None = None
    # Where the example was read ("forget.jsonl line 3"), for messages; no part of its identity.
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not isinstance(self.answer, str):
            raise DataError(f"prompt and answer must be strings, got {type(self.prompt).__name__} "
                            f"and {type(self.answer).__name__}")
        if not self.answer.strip():
            raise DataError("the answer (or text) is empty; remove the row or fill it in")
        if not self.choices and self.correct is None:
            return
        # A list from JSON or datasets is accepted and frozen into a tuple.
        object.__setattr__(self, "choices", _check_choices(self.choices))
        if isinstance(self.correct, bool) or not isinstance(self.correct, int) \
                or not 0 <= self.correct < len(self.choices):
            raise DataError(f"answer index {self.correct!r} is out of range for {len(self.choices)} choices; "
                            f"use 0 to {len(self.choices) - 1}")
        if not self.prompt.strip():
            raise DataError("a multiple-choice question is empty; fill in the question")
        if self.answer != self.choices[self.correct]:
            raise DataError(f"answer {self.answer!r} is not choices[{self.correct}] = {self.choices[self.correct]!r}")

    @property
    def kind(self) -> Literal["text", "qa", "choice"]:
        if self.choices:
            return "choice"
        return "qa" if self.prompt else "text"


def _check_choices(choices: Any) -> tuple[str, ...]:
    if not isinstance(choices, (list, tuple)) or len(choices) < 2 \
            or not all(isinstance(c, str) for c in choices):
        raise DataError(f"choices must be a list of at least 2 strings, got {_short(choices)}")
    return tuple(choices)


@dataclass(frozen=True)
class Split:
    """One of forget / retain / holdout: training examples, QA questions, multiple-choice questions."""

    name: str
    train: tuple[Example, ...] = ()
    qa: tuple[Example, ...] = ()
    choice: tuple[Example, ...] = ()

    def __post_init__(self) -> None:
        for attr, kinds in (("train", ("text", "qa")), ("qa", ("qa",)), ("choice", ("choice",))):
            examples = tuple(getattr(self, attr))
            object.__setattr__(self, attr, examples)
            wrong = [e for e in examples if not isinstance(e, Example) or e.kind not in kinds]
            if wrong:
                raise DataError(f"split {self.name!r}: {attr} holds only {' or '.join(kinds)} examples, "
                                f"got {_short(wrong[0])}")

    @classmethod
    def from_examples(cls, name: str, examples: Iterable[Example]) -> Split:
        """Texts train; QA pairs train and are asked; multiple-choice questions are only asked."""
        examples = tuple(examples)
        return cls(name,
                   train=tuple(e for e in examples if e.kind != "choice"),
                   qa=tuple(e for e in examples if e.kind == "qa"),
                   choice=tuple(e for e in examples if e.kind == "choice"))


@dataclass(frozen=True)
class UnlearningData:
    """What an unlearning run needs: forget (non-empty), retain, and an optional holdout."""

    forget: Split
    retain: Split
    holdout: Split | None = None

    def __post_init__(self) -> None:
        if not self.forget.train:
            raise DataError("the forget set is empty: it needs texts or question/answer pairs to unlearn "
                            "(multiple-choice questions are only evaluated); give a non-empty forget source")


# ---------------------------------------------------------------------------------------
# Loading


def load_examples(source: str | Path, *, fields: Mapping[str, str] | None = None, config: str | None = None,
                  split: str | None = None, text_unit: Literal["line", "paragraph"] = "line"
                  ) -> tuple[Example, ...]:
    """Read examples from a file, a directory or a hub name (see the module docstring).

    fields maps our field names (text, question, answer, choices) to the source's column
    names; config and split select a part of a Hugging Face data set or directory.
    """
    return _load(source, fields, config, split, text_unit, expect=None)


def load_tofu(source: str | Path = "locuslab/TOFU", config: str = "forget10", *, split: str = "train"
              ) -> tuple[Example, ...]:
    """TOFU question/answer pairs; config selects the part: forget01/05/10, retain90/95/99, holdout01/05/10, full."""
    return _load(source, None, config, split, "line", expect=("qa", "TOFU (question, answer)"))


def load_muse(source: str | Path = "muse-bench/MUSE-News", config: str = "knowmem", *, split: str = "forget_qa"
              ) -> tuple[Example, ...]:
    """MUSE (News or Books): knowmem question/answer, verbmem prompt/gt, raw (and privleak, scal, sust) text.

    Splits: knowmem forget_qa, retain_qa; verbmem forget; raw forget, retain1, retain2, holdout.
    """
    if config not in MUSE_CONFIGS:
        raise DataError(f"unknown MUSE config {config!r}; use one of {', '.join(MUSE_CONFIGS)}")
    fields = {"question": "prompt", "answer": "gt"} if config == "verbmem" else None
    schema = {"knowmem": "question, answer", "verbmem": "prompt, gt"}.get(config, "text")
    return _load(source, fields, config, split, "line", expect=(MUSE_CONFIGS[config], f"MUSE {config} ({schema})"))


def load_wmdp(source: str | Path = "cais/wmdp", config: str = "wmdp-bio", *, split: str = "test"
              ) -> tuple[Example, ...]:
    """WMDP 4-choice questions (question, choices, integer answer); configs wmdp-bio, wmdp-chem, wmdp-cyber.

    The WMDP corpora (cais/wmdp-corpora) are text: read them with load_examples.
    """
    return _load(source, None, config, split, "line", expect=("choice", "WMDP (question, choices, answer)"))


def _load(source: str | Path, fields: Mapping[str, str] | None, config: str | None, split: str | None,
          text_unit: str, expect: tuple[str, str] | None) -> tuple[Example, ...]:
    if text_unit not in ("line", "paragraph"):
        raise DataError(f"text_unit must be 'line' or 'paragraph', got {text_unit!r}")
    columns = _columns(fields)
    path = _resolve(source, config, split)
    if path is None:
        where, rows = str(source), _from_datasets(str(source), config, split, hub=True)
    elif path.is_dir():
        where, rows = str(path), _from_datasets(path, config, split, hub=False)
    else:
        where, rows = str(path), _read_file(path, text_unit, columns["text"])
    if not rows:
        raise DataError(f"{where} holds no examples; give a file with at least one row")
    try:
        kind = _kind(rows[0], columns, fields or {})
    except DataError:
        if not expect:
            raise
        kind = None  # for a benchmark, say which schema the source misses
    if expect and kind != expect[0]:
        raise DataError(f"{rows[0][0]} is not in the {expect[1]} schema: its fields are {_keys(rows[0][1])}")
    return tuple(_example(row, columns, kind) for row in rows)


def _columns(fields: Mapping[str, str] | None) -> dict[str, str]:
    unknown = sorted(set(fields or {}) - set(FIELDS))
    if unknown:
        raise DataError(f"unknown field name {unknown[0]!r} in fields; the fields are {', '.join(FIELDS)} "
                        f"(e.g. fields={{'question': 'prompt'}})")
    return {f: (fields or {}).get(f, f) for f in FIELDS}


def _resolve(source: str | Path, config: str | None, split: str | None) -> Path | None:
    """The local file or directory to read, or None for a hub name."""
    path = Path(source).expanduser()
    if not path.exists():
        if isinstance(source, str) and HUB_NAME.fullmatch(source) and path.suffix.lower() not in SUFFIXES:
            return None
        raise DataError(f"{source}: no such file or directory; check the path")
    if path.is_file():
        return path
    for parts in ((config, split), (config,), (split,)):
        if None in parts:
            continue
        base = path.joinpath(*parts)
        for candidate in (base, *(base.with_name(base.name + s) for s in SUFFIXES)):
            if candidate.is_file() or _saved_by_datasets(candidate):
                return candidate
    # Only a hub repository's clone names its configs (in README.md) for datasets.load_dataset.
    if config is not None and not _saved_by_datasets(path) and not (path / "README.md").is_file():
        looked = ", ".join("/".join(parts) for parts in ((config, split), (config,), (split,)) if None not in parts)
        raise DataError(f"{path} holds no config {config!r}: looked for {looked} as a save_to_disk directory or a "
                        f"{'/'.join(SUFFIXES)} file; check the config name or point to the file itself")
    return path


def _saved_by_datasets(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _read_file(path: Path, text_unit: str, text_column: str) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _from_datasets(path, None, None, hub=False)
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown file type {suffix or '(none)'!r}; use one of {', '.join(SUFFIXES)}")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; check the path and its permissions") from None
    if suffix == ".csv":
        return _csv_rows(path, content)
    if suffix == ".txt":
        units = re.split(r"\n\s*\n", content) if text_unit == "paragraph" else content.splitlines()
        # Rows are keyed by the text column so that a fields mapping reads them too.
        return [(f"{path} {text_unit} {i}", {text_column: u.strip("\n")}) for i, u in
                enumerate((u for u in units if u.strip()), 1)]
    if suffix == ".json" and content.lstrip().startswith("["):
        try:
            items = json.loads(content)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: invalid JSON ({e.msg}); fix the JSON array") from None
        return [_object(f"{path} item {i}", item) for i, item in enumerate(items, 1)]
    rows = []
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                            f"each line must be one JSON object") from None
        rows.append(_object(f"{path} line {lineno}", item))
    return rows


def _object(where: str, item: Any) -> Row:
    if not isinstance(item, dict):
        raise DataError(f"{where} is a JSON {type(item).__name__}, not an object; write {{\"text\": ...}} "
                        f"or {{\"question\": ..., \"answer\": ...}}")
    return where, item


def _csv_rows(path: Path, content: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(content, newline=""))  # keeps line breaks inside quoted cells
    rows = []
    try:
        for record in reader:
            if None in record or None in record.values():
                raise DataError(f"{path} line {reader.line_num}: {len(reader.fieldnames or ())} columns in the header, "
                                f"a different number in this row; quote cells that contain commas")
            rows.append((f"{path} line {reader.line_num}", record))
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: malformed CSV ({e})") from None
    return rows


def _from_datasets(source: str | Path, config: str | None, split: str | None, *, hub: bool) -> list[Row]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {source} needs the datasets package: pip install 'zounlearn[llm]'") from None
    where = f"{source}" + (f" [{config}]" if config else "") + (f" [{split}]" if split else "")
    try:
        if isinstance(source, Path) and _saved_by_datasets(source):
            data = datasets.load_from_disk(str(source))
        elif isinstance(source, Path) and source.is_file():
            data = datasets.load_dataset(source.suffix.lstrip("."), data_files=str(source), split="train")
        else:
            data = datasets.load_dataset(str(source), config, split=split)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        cause = one_line(f"{type(e).__name__}: {e}", 300)
        if hub:
            call = f"datasets.load_dataset({str(source)!r}" + (f", {config!r}" if config else "") + ")"
            raise DataError(f"could not load {where} from the Hugging Face hub ({cause}) and no local file or "
                            f"directory has that name; on a machine with network run {call}.save_to_disk(DIR), "
                            f"copy DIR here and pass DIR instead") from None
        raise DataError(f"datasets could not read {where} ({cause}); give a save_to_disk directory, "
                        f"a data file, or a directory datasets.load_dataset can read") from None
    if isinstance(data, datasets.DatasetDict):
        if split is None and len(data) == 1:
            split = next(iter(data))
        if split not in data:
            raise DataError(f"{where} has the splits {', '.join(data)}; choose one with split=")
        data = data[split]
    recorded = data.info.config_name
    if config and recorded not in (None, "default", config):
        raise DataError(f"{source} holds the config {recorded!r}, not {config!r}; point to a copy of {config!r}")
    return [(f"{where} row {i}", row) for i, row in enumerate(data, 1)]


def _kind(first: Row, columns: Mapping[str, str], fields: Mapping[str, str]) -> str:
    """The schema of a source, from its first row's fields."""
    where, row = first
    for ours, theirs in fields.items():
        if theirs not in row:
            raise DataError(f"{where} has no field {theirs!r} (given for {ours!r}); its fields are {_keys(row)}")
    if columns["choices"] in row:
        return "choice"
    if columns["question"] in row:
        return "qa"
    if columns["text"] in row:
        return "text"
    raise DataError(f"{where} has none of the fields text, question (+ answer, + choices); its fields are "
                    f"{_keys(row)}; name yours with fields={{'text': ...}} or "
                    f"fields={{'question': ..., 'answer': ...}}")


def _example(row: Row, columns: Mapping[str, str], kind: str) -> Example:
    where, record = row
    needed = {"text": ("text",), "qa": ("question", "answer"), "choice": ("question", "choices", "answer")}[kind]
    values = {}
    for f in needed:
        if columns[f] not in record:
            raise DataError(f"{where} has no field {columns[f]!r}; its fields are {_keys(record)}")
        values[f] = record[columns[f]]
    try:
        if kind == "text":
            return Example("", _string(values["text"], columns["text"]), source=where)
        question = _string(values["question"], columns["question"])
        if kind == "qa":
            return Example(question, _string(values["answer"], columns["answer"]), source=where)
        choices = values["choices"]
        if isinstance(choices, str) and choices.lstrip().startswith("["):  # a JSON list in a CSV cell
            try:
                choices = json.loads(choices)
            except json.JSONDecodeError as e:
                raise DataError(f"choices is not a valid JSON list ({e.msg})") from None
        choices = _check_choices(choices)
        correct = _index(values["answer"], choices)
        return Example(question, choices[correct], choices, correct, source=where)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def _string(value: Any, column: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{column!r} must be a string, got {type(value).__name__} {_short(value)}")
    if not value.strip():
        raise DataError(f"{column!r} is empty; remove the row or fill it in")
    return value


def _index(answer: Any, choices: Sequence[str]) -> int:
    """A multiple-choice answer as an index: an int, a choice's text, or digits (CSV cells are strings)."""
    index = None
    if isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    elif isinstance(answer, str):
        if answer in choices:
            return choices.index(answer)
        if answer.strip().isdigit():
            index = int(answer)
    if index is None:
        raise DataError(f"answer {_short(answer)} is neither an index nor one of the choices {_short(list(choices))}; "
                        f"give an index 0 to {len(choices) - 1} or a choice's exact text")
    if not 0 <= index < len(choices):
        raise DataError(f"answer index {index} is out of range for {len(choices)} choices; use 0 to {len(choices) - 1}")
    return index


def _keys(record: Mapping[str, Any]) -> str:
    return ", ".join(map(str, record)) or "(none)"


def _short(value: Any) -> str:
    """A bounded repr for messages."""
    return one_line(repr(value), 80)


def one_line(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
