"""`zounlearn attack relearn|retain-finetune|quantize|noise` and `zounlearn diagnose`, in-process
through main(), on the small embedded model saved as a Hugging Face directory with its data
as JSONL files: each command's JSON against the library called directly on the same model
and data, its printed table, its plot; the defaults in --help against the library's; and
bad input (one line on stderr, exit status 2, no output file)."""

from __future__ import annotations

import argparse
import inspect
import json
import math

import pytest
import torch
from tiny import SMALL_EMBEDDED, data_flags
from transformers import AutoModelForCausalLM, AutoTokenizer

import zounlearn.cli.inputs as cli_inputs
import zounlearn.cli.robustness as cli
from zounlearn import robustness
from zounlearn.cli import build_parser, main
from zounlearn.cli.inputs import load_model_and_data
from zounlearn.robustness import attacks, diagnostics
from zounlearn.unlearning import embedded_model, evaluate
from zounlearn.unlearning.report import format_metric, jsonable

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def files(small_files, tmp_path_factory):
    """The small embedded model's files and a nudged copy of it (the "unlearned" model of diagnose)."""
    torch.set_num_threads(1)
    paths = dict(small_files)
    root = tmp_path_factory.mktemp("nudged")
    model = AutoModelForCausalLM.from_pretrained(paths["model"])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    paths["nudged"] = str(root / "nudged")
    model.save_pretrained(paths["nudged"])
    AutoTokenizer.from_pretrained(paths["model"]).save_pretrained(paths["nudged"])
    return paths


def _loaded(files, model: str | None = None):
    """(model, tokenizer, data) as the commands load them."""
    options = {"model": model or files["model"], **{role: files[role] for role in ("forget", "retain", "holdout")}}
    model, tokenizer, data, _ = load_model_and_data(options, progress=False)
    return model, tokenizer, data


def _record(path) -> dict:
    return json.loads(path.read_text())


def _same(value):
    """What a value becomes in the JSON file."""
    return json.loads(json.dumps(jsonable(value)))


def test_help_documents_every_flag_with_the_library_defaults(capsys):
    assert (cli.DEFAULT_K, cli.DEFAULT_STEPS, cli.DEFAULT_LR, cli.DEFAULT_BATCH_SIZE, cli.DEFAULT_RELATIVE_STDS) == \
        (attacks.DEFAULT_K, attacks.DEFAULT_STEPS, attacks.DEFAULT_LR, attacks.DEFAULT_BATCH_SIZE,
         attacks.DEFAULT_RELATIVE_STDS)
    assert cli.DEFAULT_SCHEMES == robustness.DEFAULT_SCHEMES
    defaults = {name: p.default for fn in (attacks.relearning_attack, attacks.noise_attack)
                for name, p in inspect.signature(fn).parameters.items()}
    assert (cli.DEFAULT_WEIGHT_DECAY, cli.DEFAULT_DRAWS) == (defaults["weight_decay"], defaults["draws"])
    assert cli.DEFAULT_TS == inspect.signature(diagnostics.mode_connectivity).parameters["ts"].default

    parsers = {}
    top = build_parser()
    for action in top._subparsers._group_actions:
        for name, parser in action.choices.items():
            parsers[name] = parser
            if name == "attack":
                for nested in parser._subparsers._group_actions:
                    parsers.update({f"attack {n}": p for n, p in nested.choices.items()})
    assert {"attack relearn", "attack retain-finetune", "attack quantize", "attack noise", "diagnose"} <= set(parsers)
    expected = {"attack relearn": ["--k", "--steps", "--lr", "--batch-size", "--weight-decay", "--plot", "--seed"],
                "attack retain-finetune": ["--k", "--steps", "--lr", "--batch-size", "--weight-decay", "--plot"],
                "attack quantize": ["--schemes"], "attack noise": ["--stds", "--draws", "--seed"],
                "diagnose": ["--original", "--ts", "--plot"]}
    for name, flags in expected.items():
        options = {o for a in parsers[name]._actions for o in a.option_strings}
        for flag in ["--model", "--forget", "--retain", "--holdout", "--config", "--eval-batch-size", "--max-length",
                     "--output", "--dtype", "--device", *flags]:
            assert flag in options, (name, flag)
        for action in parsers[name]._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.option_strings)
    helps = {name: parsers[name].format_help() for name in expected}
    assert "(default: 0,5,10,20,50)" in helps["attack relearn"] and "(default: 10)" in helps["attack relearn"]
    assert "(default: 0.0001" in " ".join(helps["attack relearn"].split())
    assert "int8,int8-g128,int8-g64,int4,int4-g128,int4-g64,nf4-g64" in "".join(helps["attack quantize"].split())
    assert "(default: 0.01,0.03,0.1,0.3)" in " ".join(helps["attack noise"].split())
    assert "(default: 0,0.25,0.5,0.75,1)" in " ".join(helps["diagnose"].split())


def test_relearn_prints_writes_and_plots_what_the_library_computes(files, tmp_path, capsys):
    out, png = tmp_path / "relearn.json", tmp_path / "curve.png"
    assert main(["attack", "relearn", "--model", files["model"], *data_flags(files), "--k", "3", "--steps", "0,2",
                 "--lr", "1e-3", "--output", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    record = _record(out)
    model, tokenizer, data = _loaded(files)
    direct = robustness.relearning_attack(model, tokenizer, data, k=3, steps=(0, 2), lr=1e-3,
                                          eval_kwargs={"batch_size": 32})
    assert record["attack"] == "relearn" and record["meta"]["model"] == files["model"]
    assert record["result"] == _same(direct)
    assert record["result"]["steps"] == [0, 2] and len(record["result"]["used"]) == 3
    assert len(record["result"]["heldout"]) == len(record["result"]["whole"]) == 2
    lines = printed.splitlines()
    header = next(line for line in lines if line.startswith("steps"))
    assert "held-out forget qa acc" in header and "retain qa acc" in header and "forget loss" in header
    rows = {line.split()[0]: line.split() for line in lines[lines.index(header) + 2:][:2]}
    assert set(rows) == {"0", "2"}
    heldout = record["result"]["heldout"][1]["forget/qa_accuracy"]
    assert rows["2"][1] == f"{heldout:.3f}"
    assert png.read_bytes().startswith(PNG)


def test_retain_finetune_takes_config_file_values_and_flags_win(files, tmp_path, capsys):
    config, out, png = tmp_path / "attack.yaml", tmp_path / "retain.json", tmp_path / "retain.png"
    config.write_text("k: 4\nsteps: [0, 3]\nbatch-size: 2\nseed: 5\nlr: 1.0e-3\n")
    assert main(["attack", "retain-finetune", "--model", files["model"], *data_flags(files), "--config",
                 str(config), "--steps", "0,1", "--output", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    result = _record(out)["result"]
    assert result["steps"] == [0, 1] and "heldout" not in result
    assert result["settings"] == {"k": 4, "lr": 1e-3, "batch_size": 2, "weight_decay": 0.0, "seed": 5,
                                  "max_length": None}
    model, tokenizer, data = _loaded(files)
    direct = robustness.retain_finetune_attack(model, tokenizer, data, k=4, steps=[0, 1], lr=1e-3, batch_size=2,
                                               seed=5, eval_kwargs={"batch_size": 32})
    assert result == _same(direct)
    assert "held-out" not in printed and "retain qa acc" in printed
    assert png.read_bytes().startswith(PNG)


def test_quantize_has_a_baseline_row_and_matches_the_library(files, tmp_path, capsys):
    out = tmp_path / "quantize.json"
    assert main(["attack", "quantize", "--model", files["model"], *data_flags(files), "--schemes", "int8, int4-g64",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    record = _record(out)
    model, tokenizer, data = _loaded(files)
    direct = robustness.quantization_attack(model, tokenizer, data, schemes=["int8", "int4-g64"],
                                            eval_kwargs={"batch_size": 32})
    assert record["schemes"] == ["int8", "int4-g64"]
    assert record["result"] == _same(direct)
    assert record["baseline"] == _same(evaluate(model, tokenizer, data, batch_size=32))
    rows = {line.split()[0]: line for line in printed.splitlines() if line.split()}
    assert {"none", "int8", "int4-g64"} <= set(rows)
    change = direct["int4-g64"]["forget/loss"] - record["baseline"]["forget/loss"]
    expected = f"{format_metric(direct['int4-g64']['forget/loss'], 'forget/loss')} " \
               f"({format_metric(change, 'forget/loss', signed=True)})"
    assert expected in rows["int4-g64"]


def test_noise_on_the_embedded_model_reports_mean_and_std(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli_inputs, "_embedded", lambda options, progress: embedded_model(
        0, config=SMALL_EMBEDDED, cache_dir=files["cache"]))
    out = tmp_path / "noise.json"
    assert main(["attack", "noise", "--model", "embedded", "--stds", "0,0.1", "--draws", "2", "--seed", "3",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    record = _record(out)
    model, tokenizer, data = embedded_model(0, config=SMALL_EMBEDDED, cache_dir=files["cache"])
    assert record["meta"]["forget"] == "synthetic people (embedded)"
    assert set(record["result"]) == {"0.0", "0.1"}
    assert record["result"]["0.0"]["mean"] == _same(evaluate(model, tokenizer, data, batch_size=32))
    assert all(value == 0 for value in record["result"]["0.0"]["std"].values())
    direct = robustness.noise_attack(model, tokenizer, data, relative_stds=[0.1], draws=2, seed=3,
                                     eval_kwargs={"batch_size": 32})
    assert record["result"]["0.1"] == _same(direct[0.1])
    noisy = [line for line in printed.splitlines() if line.startswith("0.1 ")]
    assert len(noisy) == 1 and noisy[0].count("±") >= 4
    mean, std = direct[0.1]["mean"]["forget/loss"], direct[0.1]["std"]["forget/loss"]
    assert f"{format_metric(mean, 'forget/loss')} ± {format_metric(std, 'forget/loss')}" in noisy[0]


def _hand_distance(a, b) -> float:
    ours, theirs = dict(a.named_parameters()), dict(b.named_parameters())
    return math.sqrt(sum((theirs[name].double() - p.double()).square().sum().item() for name, p in ours.items()))


def test_diagnose_distance_and_connectivity(files, tmp_path, capsys):
    out, png = tmp_path / "diagnose.json", tmp_path / "line.png"
    assert main(["diagnose", "--original", files["model"], "--model", files["nudged"], *data_flags(files),
                 "--ts", "0,0.5,1", "--output", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    record = _record(out)
    original, tokenizer, data = _loaded(files)
    nudged, _, _ = _loaded(files, files["nudged"])
    total = _hand_distance(original, nudged)
    assert total > 0 and math.isclose(record["distance"]["total"], total, rel_tol=1e-12)
    norm = math.sqrt(sum(p.double().square().sum().item() for p in original.parameters()))
    assert math.isclose(record["distance"]["relative"], total / norm, rel_tol=1e-12)
    assert set(record["distance"]["per_layer"]) == {"0", "other"}  # one block
    assert math.isclose(math.hypot(*record["distance"]["per_layer"].values()), total, rel_tol=1e-12)
    connectivity = record["connectivity"]
    assert connectivity["t"] == [0.0, 0.5, 1.0] and record["meta"]["original"] == files["model"]
    assert connectivity["metrics"][0] == _same(evaluate(original, tokenizer, data, batch_size=32))
    assert connectivity["metrics"][2] == _same(evaluate(nudged, tokenizer, data, batch_size=32))
    assert "forget/loss" in connectivity["barrier"] and all(h >= 0 for h in connectivity["barrier"].values())
    assert f"{total:.6g}" in printed and "barrier heights" in printed
    assert [line.split()[0] for line in printed.splitlines() if line[:2] in ("0 ", "0.", "1 ")][:3] == \
        ["0", "0.5", "1"]
    assert png.read_bytes().startswith(PNG)


def test_diagnose_takes_the_embedded_model_as_original(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli_inputs, "_embedded", lambda options, progress: embedded_model(
        0, config=SMALL_EMBEDDED, cache_dir=files["cache"]))
    out = tmp_path / "diagnose.json"
    assert main(["diagnose", "--original", "embedded", "--model", files["nudged"], *data_flags(files), "--ts",
                 "1,0", "--output", str(out)]) == 0
    original, _, _ = _loaded(files)
    nudged, _, _ = _loaded(files, files["nudged"])
    assert math.isclose(_record(out)["distance"]["total"], _hand_distance(original, nudged), rel_tol=1e-12)


BAD = {
    "unknown scheme": (["attack", "quantize", "--schemes", "int8,int3"], "unknown quantization scheme 'int3'"),
    "empty scheme": (["attack", "quantize", "--schemes", "int8,"], "--schemes takes a comma-separated list"),
    "malformed steps": (["attack", "relearn", "--steps", "0,,5"], "--steps takes a comma-separated list"),
    "steps not numbers": (["attack", "retain-finetune", "--steps", "0,five"], "--steps takes"),
    "empty steps": (["attack", "relearn", "--steps", ""], "--steps takes"),
    "steps out of order": (["attack", "relearn", "--steps", "5,0"], "strictly increasing"),
    "k too large": (["attack", "relearn", "--k", "10", "--steps", "0"], "--k 10 is too large"),
    "retain k too large": (["attack", "retain-finetune", "--k", "1000", "--steps", "0"], "use --k from 1 to 90"),
    "k zero": (["attack", "relearn", "--k", "0"], "--k must be an integer >= 1"),
    "lr": (["attack", "relearn", "--lr", "0"], "--lr must be a finite number > 0"),
    "negative std": (["attack", "noise", "--stds", "0.1,-1"], "--stds must be >= 0"),
    "std not a number": (["attack", "noise", "--stds", "0.1,nan"], "--stds takes"),
    "draws": (["attack", "noise", "--draws", "0"], "--draws must be an integer >= 1"),
    "ts without 1": (["diagnose", "--original", "MODEL", "--ts", "0,0.5"], "including 0"),
    "no original": (["diagnose"], "no original model given"),
    "config steps": (["attack", "relearn", "--config", "CONFIG"], "--steps takes"),
}


@pytest.mark.parametrize("case", [*BAD, "missing model", "missing model dir", "no attack", "unknown flag"])
def test_bad_input_is_one_line_exit_2_and_no_output(files, tmp_path, capsys, case):
    out = tmp_path / "out.json"
    config = tmp_path / "bad.yaml"
    config.write_text("steps: [0, x]\n")
    if case in BAD:
        argv, match = BAD[case]
        argv = [files["model"] if a == "MODEL" else str(config) if a == "CONFIG" else a for a in argv]
        argv = [*argv, "--model", files["model"], *data_flags(files), "--output", str(out)]
    elif case == "missing model":
        argv, match = ["attack", "noise", *data_flags(files), "--output", str(out)], "no model given"
    elif case == "missing model dir":
        argv, match = ["attack", "quantize", "--model", str(tmp_path / "nowhere"), *data_flags(files)], "nowhere"
    else:
        argv = ["attack"] if case == "no attack" else ["attack", "noise", "--model", files["model"], "--stdz", "1"]
        match = "required: ATTACK" if case == "no attack" else "unrecognized arguments: --stdz"
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and match in err, err
        return
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("zounlearn "), err
    assert match in err, err
    assert not out.exists() and "written" not in captured.out
