"""`zounlearn demo`, `unlearn` and `eval`: runs on the small embedded model saved as a Hugging
Face directory with its data as JSONL files, the config file and flag precedence, resume,
and every bad-input case of issue 4 (one line on stderr, exit status 2, no finished-looking
run directory). In-process through main(), except the demo, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import data_flags

from zounlearn.cli import main


@pytest.fixture(scope="module")
def files(small_files):
    torch.set_num_threads(1)
    return small_files


def _args(files, *extra: str, output=None) -> list[str]:
    args = ["unlearn", "--model", files["model"], *data_flags(files, ("forget",)), *data_flags(files, ("retain",)),
            *data_flags(files, ("holdout",)), "--no-progress", "--eval-batch-size", "64"]
    return args + (["--output", str(output)] if output is not None else []) + list(extra)


def _fails(capsys, argv: list[str], match: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert match in err, err
    return err


def test_unlearn_runs_from_files_and_writes_the_run_directory(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(files, "--optimizer", "adamw", "--lr", "1e-3", "--steps", "20", output=out)) == 0
    printed = capsys.readouterr().out
    assert "forget/qa_accuracy" in printed and "mia_min_k" in printed
    for name in ("config.json", "metrics.jsonl", "report.json", "report.md", "loss.png", "metrics.png",
                 "model/model.safetensors"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["forget/qa_accuracy"] == 1.0
    assert report["after"]["forget/qa_accuracy"] <= 0.2  # the same bound as tests/test_loop.py
    assert report["config"]["meta"]["forget"] == files["forget"]


def test_config_file_and_flags_precedence(files, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("optimizer: signsgd\nlr: 1.0e-4\nsteps: 3\nbatch-size: 4\n"
                      "optimizer_option: {weight_decay: 0.1}\nobjective_option: {retain_weight: 2}\n")
    out = tmp_path / "run"
    assert main(_args(files, "--config", str(config), "--steps", "2", output=out)) == 0
    loop = json.loads((out / "config.json").read_text())["loop"]
    assert (loop["optimizer"], loop["lr"], loop["steps"], loop["batch_size"]) == ("signsgd", 1e-4, 2, 4)
    assert loop["optimizer_options"] == {"weight_decay": 0.1} and loop["objective_options"] == {"retain_weight": 2}
    json_config = tmp_path / "run.json"
    json_config.write_text(json.dumps({"optimizer": "sgd", "lr": 0.01, "steps": 1}))
    assert main(_args(files, "--config", str(json_config), output=tmp_path / "json")) == 0
    assert json.loads((tmp_path / "json" / "config.json").read_text())["loop"]["optimizer"] == "sgd"


def test_resume_through_the_command_line(files, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    args = _args(files, "--optimizer", "adamw", "--steps", "4", "--checkpoint-every", "2", output=out)
    _fails(capsys, args, "exists and is not empty")
    (out / "checkpoints").rmdir()
    assert main(args) == 0
    _fails(capsys, args + ["--resume"], "finished run")
    _fails(capsys, [a for a in args if a not in ("--output", str(out))] + ["--resume"], "--resume needs --output")


def test_gradient_accumulation_steps_flag_config_key_and_bad_values(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(files, "--optimizer", "sgd", "--steps", "2", "--gradient-accumulation-steps", "2",
                      output=out)) == 0
    assert json.loads((out / "config.json").read_text())["loop"]["gradient_accumulation_steps"] == 2
    bad = tmp_path / "bad"
    _fails(capsys, _args(files, "--gradient-accumulation-steps", "0", output=bad),
           "gradient_accumulation_steps must be an integer >= 1, got 0")
    _fails(capsys, _args(files, "--gradient-accumulation-steps", "9", output=bad), "is more than batch_size 8")
    config = _write(tmp_path / "k.yaml", "gradient_accumulation_steps: two\n")
    _fails(capsys, _args(files, "--config", str(config), output=bad), "must be an integer >= 1, got 'two'")
    assert not bad.exists()


def test_eval_prints_and_writes_metrics(files, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", files["model"], *data_flags(files, ("forget",)), *data_flags(files, ("retain",)),
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["forget/qa_accuracy"] == 1.0 and "holdout/loss" not in metrics
    assert "forget/loss" in printed and f"{metrics['forget/loss']:.4f}" in printed


@pytest.mark.parametrize("case", ["missing file", "empty forget", "unknown field", "not a model", "objective",
                                  "optimizer", "optimizer option", "cuda", "dtype", "bad yaml", "config key",
                                  "option syntax", "no data"])
def test_bad_input_is_one_line_exit_2_and_no_finished_run(files, tmp_path, capsys, case):
    empty, renamed, yaml_file = tmp_path / "empty.jsonl", tmp_path / "renamed.jsonl", tmp_path / "bad.yaml"
    empty.write_text("")
    renamed.write_text('{"q": "Who?", "a": "Ada"}\n')
    yaml_file.write_text("steps: [1,\n")
    out = tmp_path / "run"
    argv, match = {
        "missing file": (_args(files, "--forget", "missing.jsonl", output=out), "missing.jsonl: no such file"),
        "empty forget": (["unlearn", "--model", files["model"], "--forget", str(empty), "--output", str(out)],
                         "empty"),
        "unknown field": (["unlearn", "--model", files["model"], "--forget", str(renamed), "--fields",
                           "question=question,answer=a", "--output", str(out)], "question"),
        "not a model": (["unlearn", "--model", files["forget"][0], *data_flags(files, ("forget",)),
                         "--output", str(out)], "not a model directory"),
        "objective": (_args(files, "--objective", "npx", output=out), "invalid choice: 'npx'"),
        "optimizer": (_args(files, "--optimizer", "adma", output=out), "invalid choice: 'adma'"),
        "optimizer option": (_args(files, "--optimizer", "adazo", "--optimizer-option", "momentum=0.9", output=out),
                             "no option momentum"),
        "cuda": (_args(files, "--device", "cuda:99", output=out),  # no machine has a 100th GPU
                 "use cuda:0" if torch.cuda.is_available() else "use device 'cpu'"),
        "dtype": (_args(files, "--dtype", "float8", output=out), "invalid choice: 'float8'"),
        "bad yaml": (_args(files, "--config", str(yaml_file), output=out), "not valid YAML"),
        "config key": (_args(files, "--config", str(_write(tmp_path / "k.yaml", "stepz: 3\n")), output=out),
                       "unknown option stepz"),
        "option syntax": (_args(files, "--objective-option", "beta", output=out), "KEY=VALUE"),
        "no data": (["unlearn", "--model", files["model"], "--output", str(out)], "--forget SOURCE"),
    }[case]
    if case in ("objective", "optimizer", "dtype"):  # argparse's own errors exit through SystemExit
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and match in err, err
    else:
        _fails(capsys, argv, match)
    assert not (out / "report.json").exists()
    assert not out.exists() or not any(out.iterdir()) or case == "optimizer option"


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.slow
def test_demo_as_a_user_runs_it(tmp_path, embedded_cache):
    """`zounlearn demo` end to end on the real embedded model (built once per session by the fixture)."""
    env = {**os.environ, "ZOUNLEARN_CACHE": str(embedded_cache)}
    out = subprocess.run([sys.executable, "-m", "zounlearn", "demo", "--steps", "30", "--no-progress", "--output",
                          str(tmp_path / "demo")], capture_output=True, text=True, timeout=600, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["config"]["loop"]["optimizer"] == "hybrid" and report["config"]["loop"]["objective"] == "npo"
    assert report["before"]["forget/qa_accuracy"] >= 0.9 and report["before"]["retain/qa_accuracy"] >= 0.9
    assert report["after"]["forget/qa_accuracy"] < report["before"]["forget/qa_accuracy"]
    assert "forget/qa_accuracy" in out.stdout and (tmp_path / "demo" / "metrics.png").is_file()
    # The field's numbers beside ours, against the embedded model's retrain model.
    assert "forget_quality" in out.stdout and "privleak" in out.stdout
    assert report["before"]["forget_quality"] < 1e-3 and report["before"]["privleak"] < -50


def test_eval_compares_with_a_retain_model(files, tmp_path, capsys):
    """--retain-model gives privleak (forget_quality too where the questions carry perturbed answers): the model
    against itself is at 0; without the flag there is no retain model for data from files."""
    out = tmp_path / "metrics.json"
    args = ["eval", "--model", files["model"], *data_flags(files)]
    assert main([*args, "--retain-model", files["model"], "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["metrics"]["privleak"] == 0.0 and metrics["meta"]["retain_model"] == files["model"]
    assert "privleak" in capsys.readouterr().out
    assert main([*args, "--output", str(out)]) == 0 and "privleak" not in json.loads(out.read_text())["metrics"]
    capsys.readouterr()
    _fails(capsys, [*args, "--retain-model", "embedded"], "--retain-model embedded is not a retain model")
