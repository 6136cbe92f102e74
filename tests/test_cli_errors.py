"""Issue 11's command-line cases through the installed `zounlearn` command, as a user runs it, on
the small embedded model saved as a Hugging Face directory (64 positions) and its data as
JSONL files: bad input of every kind is one line on stderr, exit status 2, before any model
is loaded or output written; examples longer than the context are truncated with one warning
(or a too-long prompt refused, naming its file and line); a resume under other conditions is
refused; a diverging run stops. And issue 10's rule: zounlearn's own errors are one line, any
other exception keeps its traceback (exit status 1). Last, a property test: random bad option
values never give a traceback."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import pytest
import torch
from commands import assert_one_line_error, environment, run, run_all
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import data_flags

from zounlearn.cli import main

WORDS = " ".join(["word"] * 100)  # 100 tokens with the embedded word-level tokenizer: past the 64 positions


def _jsonl(path: Path, *rows: dict) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _config(path: Path, values: dict) -> str:
    path.write_text(json.dumps(values))
    return str(path)


@pytest.fixture(scope="module")
def place(small_files, tmp_path_factory):
    """The small model's files, the long examples, and a work directory the commands run in."""
    root = tmp_path_factory.mktemp("cli-errors")
    files = dict(small_files)
    files["root"] = root
    files["long_answer"] = _jsonl(root / "long-answer.jsonl", {"question": "Who is Ada?", "answer": WORDS})
    files["long_text"] = _jsonl(root / "long-text.jsonl", {"text": WORDS})
    files["long_prompt"] = _jsonl(root / "long-prompt.jsonl", {"question": "Who is Ada?", "answer": "Ada"},
                                  {"question": WORDS + "?", "answer": "Ada"})
    (root / "a-file").write_text("not a directory")
    return files


def _unlearn(files: dict, *extra: str, output: str | None = "run") -> list[str]:
    args = ["unlearn", "--model", files["model"], *data_flags(files, ("forget", "retain")), "--no-progress",
            "--threads", "1"]
    return args + (["--output", str(files["root"] / output)] if output else []) + list(extra)


def _qa(files: dict, role: str) -> str:
    return next(path for path in files[role] if path.endswith("-qa.jsonl"))


# --- bad input: (command, fragments of the one error line, a path that must not exist afterwards)


def _bad_input(files: dict) -> dict[str, tuple[list[str], tuple[str, ...], str | None]]:
    root, model = files["root"], files["model"]
    config = lambda name, values: _config(root / f"{name}.json", values)  # noqa: E731
    quick = ("--steps", "1", "--optimizer", "adamw")
    return {
        # 1: a prompt that leaves no room for its answer, and a max_length above the context
        "prompt past the context": (
            ["unlearn", "--model", model, "--forget", files["long_prompt"], "--retain", _qa(files, "retain"),
             "--no-progress", "-o", str(root / "out-prompt")], (f"{files['long_prompt']} line 2", "64 tokens"),
            "out-prompt"),
        "max-length above the context": (_unlearn(files, "--max-length", "100", output="out-maxlen"),
                                         ("max_length 100", "context of 64"), "out-maxlen"),
        # 5: inputs that would be ignored or recorded wrongly
        "eval --retain without --forget": (["eval", "--model", "embedded", "--retain", _qa(files, "retain")],
                                           ("--retain is used only with --forget",), None),
        "resume: 'no'": (_unlearn(files, "--config", config("resume", {"resume": "no"}), output="out-resume"),
                         ("--resume must be true or false", "'no'"), "out-resume"),
        "save_model: 'false'": (_unlearn(files, "--config", config("save", {"save_model": "false"}),
                                         output="out-save"), ("--save-model must be true or false",), "out-save"),
        # 6: late validation
        "eval -o under a file": (["eval", "--model", model, "--forget", _qa(files, "forget"), "-o",
                                  str(root / "a-file" / "metrics.json")], ("cannot be created", "is a file"), None),
        "relearn --plot under a file": (["attack", "relearn", "--model", model, "--forget", _qa(files, "forget"),
                                         "--plot", str(root / "a-file" / "curve.png")], ("--plot", "is a file"), None),
        "quantize -o a directory": (["attack", "quantize", "--model", model, "--forget", _qa(files, "forget"),
                                     "-o", str(root)], ("is a directory",), None),
        "lr 1e300": (_unlearn(files, "--lr", "1e300", *quick[:2], output="out-lr"), ("lr must be a number",),
                     "out-lr"),
        "train_mode: 'false'": (_unlearn(files, "--config", config("train", {"train_mode": "false"}),
                                         output="out-train"), ("--train-mode must be true or false",), "out-train"),
        # 7: what gave tracebacks
        "hybrid fo_lr=abc": (_unlearn(files, "--optimizer", "hybrid", "--optimizer-option", "fo_lr=abc",
                                      output="out-fo-lr"), ("--optimizer-option",), "out-fo-lr"),
        "hybrid zo_betas=[0.9]": (_unlearn(files, "--optimizer", "hybrid", "--optimizer-option", "zo_betas=[0.9]",
                                           output="out-zo-betas"), ("betas",), "out-zo-betas"),
        "hybrid zo_betas=5": (_unlearn(files, "--optimizer", "hybrid", "--optimizer-option", "zo_betas=5",
                                       output="out-zo-betas5"), ("betas",), "out-zo-betas5"),
        "adamw betas=[0.9]": (_unlearn(files, "--optimizer", "adamw", "--optimizer-option", "betas=[0.9]",
                                       output="out-betas"), ("--optimizer-option",), "out-betas"),
        "adamw betas=5": (_unlearn(files, "--optimizer", "adamw", "--optimizer-option", "betas=5",
                                   output="out-betas5"), ("--optimizer-option",), "out-betas5"),
        "adamw weight_decay=abc": (_unlearn(files, "--optimizer", "adamw", "--optimizer-option", "weight_decay=abc",
                                            output="out-wd"), ("--optimizer-option",), "out-wd"),
        "sgd momentum=abc": (_unlearn(files, "--optimizer", "sgd", "--optimizer-option", "momentum=abc",
                                      output="out-momentum"), ("--optimizer-option",), "out-momentum"),
        "config forget: 5": (["unlearn", "--model", model, "--config", config("forget", {"forget": 5}), "-o",
                              str(root / "out-forget5")], ("--forget must be a data source", "5"), "out-forget5"),
        "config output: [a]": (["unlearn", "--model", model, "--config", config("output", {"output": ["a"]})],
                               ("--output must be text", "['a']"), "a"),
        "model config that does not match its weights": (
            _unlearn({**files, "model": str(root / "mismatched")}, output="out-mismatch"),
            ("does not match its config.json", "has no weights for"), "out-mismatch"),
        "info --timing --numel 0": (["info", "--timing", "--numel", "0"], ("--numel must be an integer >= 1",), None),
    }


@pytest.fixture(scope="module")
def bad_input(place):
    mismatched = place["root"] / "mismatched"  # the small model's weights (1 block) under a 2-block config
    mismatched.mkdir()
    for file in Path(place["model"]).iterdir():
        (mismatched / file.name).write_bytes(file.read_bytes())
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "n_layer": 2}))
    cases = _bad_input(place)
    assert tuple(cases) == BAD_INPUT
    outcomes = run_all({name: args for name, (args, _, _) in cases.items()}, place["root"], environment(
        place["cache"]))
    return {name: (outcomes[name], fragments, gone) for name, (_, fragments, gone) in cases.items()}


BAD_INPUT = ("prompt past the context", "max-length above the context", "eval --retain without --forget",
             "resume: 'no'", "save_model: 'false'", "eval -o under a file", "relearn --plot under a file",
             "quantize -o a directory", "lr 1e300", "train_mode: 'false'", "hybrid fo_lr=abc", "hybrid zo_betas=[0.9]",
             "hybrid zo_betas=5", "adamw betas=[0.9]", "adamw betas=5", "adamw weight_decay=abc", "sgd momentum=abc",
             "config forget: 5", "config output: [a]", "model config that does not match its weights",
             "info --timing --numel 0")


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_exit_2_before_any_work(bad_input, place, case):
    outcome, fragments, gone = bad_input[case]
    assert_one_line_error(outcome, *fragments)
    if gone is not None:
        assert not (place["root"] / gone).exists(), case
    assert "Loading weights" not in outcome.stderr or case == "model config that does not match its weights"


# --- 1: examples longer than the context are truncated, with one warning


def test_long_examples_are_truncated_with_one_warning(place):
    files, root = place, place["root"]
    long = ["--forget", files["long_answer"], "--forget", files["long_text"], "--forget", _qa(files, "forget"),
            "--retain", _qa(files, "retain")]
    outcomes = run_all({
        "unlearn": ["unlearn", "--model", files["model"], *long, "--optimizer", "adamw", "--steps", "2",
                    "--no-progress", "-o", str(root / "long-run")],
        "eval": ["eval", "--model", files["model"], *long, "-o", str(root / "long-eval.json")],
        "relearn": ["attack", "relearn", "--model", files["model"], *long, "--k", "1", "--steps", "0,1"],
    }, root, environment(files["cache"]))  # the other attacks fit the same way: tests/test_context.py
    for name, outcome in outcomes.items():
        assert outcome.returncode == 0, (name, outcome.stderr[-3000:])
        warnings = [line for line in outcome.lines("warning") if "longer than" in line]
        assert len(warnings) == 1, (name, outcome.stderr[-3000:])
        assert "longer than 64 tokens (the model's context)" in warnings[0] and "answer cut" in warnings[0]
    assert (root / "long-run" / "report.json").is_file()
    assert json.loads((root / "long-eval.json").read_text())["metrics"]["forget/qa_accuracy"] < 1.0


# --- 4: a resume that would change the result is refused (5: a config's option mapping merged with the
# flags); 11: a diverging run stops


def test_resume_refuses_other_threads_or_edited_data(place, tmp_path):
    """Also: the config file's option mappings and the flags' pairs are merged, and config.json records the merge."""
    forget = tmp_path / "forget.jsonl"
    forget.write_text(Path(_qa(place, "forget")).read_text())
    config = _config(tmp_path / "run.json", {"optimizer": "adamw", "lr": 1e-4,
                                             "optimizer_option": {"weight_decay": 0.1, "eps": 1e-6},
                                             "objective_option": {"retain_weight": 2}})
    args = ["unlearn", "--model", place["model"], "--forget", str(forget), "--retain", _qa(place, "retain"),
            "--config", config, "--optimizer-option", "eps=1e-7", "--objective-option", "beta=0.2", "--steps", "4",
            "--checkpoint-every", "2", "--no-progress", "-o", str(tmp_path / "run"), "--threads", "1"]
    env = environment(place["cache"])
    assert run(args, tmp_path, env).returncode == 0
    loop = json.loads((tmp_path / "run" / "config.json").read_text())["loop"]
    assert loop["optimizer_options"] == {"weight_decay": 0.1, "eps": 1e-7}
    assert loop["objective_options"] == {"retain_weight": 2, "beta": 0.2}
    (tmp_path / "run" / "report.json").unlink()  # an unfinished run again, its newest checkpoint at step 2
    threads = run([*args[:-1], "2", "--resume"], tmp_path, env)
    assert_one_line_error(threads, "cannot resume", "threads: 1 then, 2 now")
    forget.write_text(forget.read_text().replace("Tallinn", "Riga", 1) + "\n")
    edited = run([*args, "--resume"], tmp_path, env)
    assert_one_line_error(edited, "cannot resume", "the forget data changed")
    assert not (tmp_path / "run" / "report.json").exists()


def test_a_diverging_run_stops_with_an_error_and_keeps_its_last_checkpoint(place, tmp_path):
    outcome = run(["unlearn", "--model", place["model"], *data_flags(place, ("forget", "retain")), "--optimizer",
                   "adamw", "--lr", "1e30", "--steps", "10", "--checkpoint-every", "1", "--no-progress", "-o",
                   str(tmp_path / "run")], tmp_path, environment(place["cache"]))
    assert_one_line_error(outcome, "diverged", "not finite for 3 steps in a row", "newest checkpoint, step")
    run_dir = tmp_path / "run"
    assert not (run_dir / "report.json").exists() and not (run_dir / "model").exists()
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(steps) == 1 and steps[0] in outcome.lines("error")[0].replace("step ", "step-0000000")


# --- issue 10: the project's own errors are one line; anything else is a bug with its traceback


def test_an_unexpected_exception_keeps_its_traceback_and_exit_1(place, tmp_path, monkeypatch, capsys):
    import zounlearn.cli.unlearn as cli_unlearn

    def bug(*args, **kwargs):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(cli_unlearn, "check_writable", bug)
    with pytest.raises(ValueError, match="a bug"):  # main() does not swallow it: Python prints it and exits 1
        main(["unlearn", "--model", place["model"], *data_flags(place, ("forget",)), "-o", str(tmp_path / "x")])


def test_an_os_error_is_one_line_naming_the_path(place, tmp_path, monkeypatch, capsys):
    import zounlearn.cli.unlearn as cli_unlearn

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked.jsonl"))

    monkeypatch.setattr(cli_unlearn, "load_model_and_data", unreadable)
    assert main(["unlearn", "--model", place["model"], *data_flags(place, ("forget",)), "-o",
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"zounlearn unlearn: error: {tmp_path / 'locked.jsonl'}: Permission denied"


# --- the property: random bad option values never give a traceback

INTEGERS = {"steps": 1, "batch_size": 1, "retain_batch_size": 1, "gradient_accumulation_steps": 1, "eval_every": 0,
            "eval_batch_size": 1,
            "checkpoint_every": 0, "seed": 0, "max_length": 2, "threads": 1}
BOOLEANS = ("resume", "save_model", "progress", "train_mode")
TEXTS = ("model", "dtype", "device", "objective", "optimizer", "text_unit")  # output: a word would be a valid path
VALID_TEXT = {"float32", "bfloat16", "float16", "cpu", "npo", "ga", "graddiff", "simnpo", "rmu", "line", "paragraph",
              "hybrid", "adamw", "sgd", "signsgd", "signadam", "compressed_adam", "sophia", "zo_sgd", "zo_signsgd",
              "zo_adam", "adazo", "embedded"}
WORD = st.text(string.ascii_letters, min_size=1, max_size=8).filter(
    lambda w: w.lower() not in VALID_TEXT | {"true", "false", "null", "nan", "infinity"})
NOT_A_NUMBER = st.one_of(WORD, st.lists(st.integers(), max_size=2), st.dictionaries(WORD, st.integers(), max_size=1),
                         st.booleans())


def _bad_values() -> st.SearchStrategy[tuple[str, object]]:
    """(option, a value it must refuse), as a config file would hold them."""
    integer = st.sampled_from(sorted(INTEGERS)).flatmap(lambda name: st.tuples(st.just(name), st.one_of(
        NOT_A_NUMBER, st.integers(max_value=INTEGERS[name] - 1), st.floats())))
    real = st.sampled_from(["lr", "epochs"]).flatmap(lambda name: st.tuples(st.just(name), st.one_of(
        NOT_A_NUMBER, st.floats(max_value=-1e-9), st.sampled_from([float("nan"), float("inf"), 1e300]))))
    boolean = st.tuples(st.sampled_from(BOOLEANS), st.one_of(WORD, st.integers(), st.none(), st.lists(st.booleans())))
    text = st.tuples(st.sampled_from(TEXTS), st.one_of(WORD, st.integers(), st.lists(WORD, min_size=1, max_size=2)))
    output = st.tuples(st.just("output"), st.one_of(st.integers(), st.lists(WORD, min_size=1), st.booleans()))
    sources = st.tuples(st.sampled_from(["forget", "retain", "holdout"]),
                        st.one_of(st.integers(), st.lists(st.integers(), min_size=1), st.dictionaries(WORD, WORD)))
    unknown = st.dictionaries(WORD.map("no_".__add__), st.integers(), min_size=1, max_size=2)  # no such option
    options = st.tuples(st.sampled_from(["optimizer_option", "objective_option"]),
                        st.one_of(WORD, st.integers(), unknown))
    fields = st.tuples(st.just("fields"), st.one_of(st.integers(), st.lists(WORD, min_size=1), WORD))
    return st.one_of(integer, real, boolean, text, output, sources, options, fields)


@pytest.fixture(scope="module", autouse=True)
def offline():
    """A hub name must fail at once here, not after a connection attempt."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    if previous is None:
        del os.environ["HF_HUB_OFFLINE"]
    else:
        os.environ["HF_HUB_OFFLINE"] = previous


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=_bad_values(), optimizer=st.sampled_from(["adamw", "sgd", "signadam", "zo_sgd", "adazo", "hybrid"]),
       option=st.sampled_from(["lr", "betas", "weight_decay", "momentum", "eps", "mu", "queries", "fo_lr", "zo_lr",
                               "block", "dist", "fo_optimizer", "zo_betas"]), value=WORD)
def test_random_bad_option_values_never_give_a_traceback(place, tmp_path_factory, capsys, bad, optimizer, option,
                                                          value):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("property")
    name, bad_value = bad
    out = root / "run"
    valid = {"model": place["model"], "forget": place["forget"], "retain": place["retain"], "steps": 1,
             "progress": False, "output": str(out)}  # every option in the file: a flag would override the bad one
    from_file = main(["unlearn", "--config", _config(root / "config.json", {**valid, name: bad_value})])
    # An optimizer option given as a word where every option of every optimizer wants a number, a pair or a name.
    flag = main(["unlearn", "--model", place["model"], *data_flags(place, ("forget", "retain")), "--no-progress",
                 "--steps", "1", "--optimizer", optimizer, "--optimizer-option", f"{option}={value}", "-o", str(out)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert (from_file, flag) == (2, 2) and len(errors) == 2, (bad, optimizer, option, value, err)
    assert not out.exists() or not any(out.iterdir())
