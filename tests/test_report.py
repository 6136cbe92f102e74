"""The run's output: metrics.jsonl parsing (a crash-truncated last line, a corrupt one), the
terminal and Markdown tables, the plots as real PNGs, and write_report's files (NaN as null,
no temporary files left)."""

from __future__ import annotations

import json
import math
import sys

import pytest

from zounlearn.unlearning.report import markdown_report, metrics_table, plot_run, read_metrics, write_report

BEFORE = {"forget/qa_accuracy": 1.0, "forget/loss": 1.25, "retain/qa_accuracy": 0.98, "holdout/loss": 5.0,
          "mia_min_k": 0.9, "forget/perplexity": 3.49, "forget_quality": 2.5e-12, "privleak": -99.5}
AFTER = {"forget/qa_accuracy": 0.1, "forget/loss": 12.5, "retain/qa_accuracy": 0.95, "holdout/loss": 5.1,
         "mia_min_k": 0.52, "forget/perplexity": math.inf, "retain/loss": 0.5, "forget_quality": 0.2,
         "privleak": 3.0, "my/own": 7.0}
CONFIG = {"model": "embedded", "objective": "npo", "optimizer": {"name": "hybrid", "lr": 1e-5}, "steps": 6, "seed": 3}
SUMMARY = {"steps": 6, "seconds": 3.0}


def _history(*, evals: bool = True) -> list[dict]:
    records = [{"type": "eval", "step": 0, "elapsed": 0.0, "metrics": BEFORE}] if evals else []
    for step in range(1, 7):
        loss = None if step == 4 else 3.0 - 40.0 * step  # gradient ascent: large negative; step 4 skipped
        records.append({"type": "train", "step": step, "epoch": step / 4, "loss": loss,
                        "phase": "fo" if step % 3 == 0 else "zo", "lr": 1e-5, "elapsed": 0.5 * step})
    if evals:
        records.append({"type": "eval", "step": 6, "elapsed": 3.0, "metrics": AFTER})
    return records


def _row(text: str, key: str) -> list[str]:
    """The cells of the row of `key` in a plain-text or Markdown table."""
    rows = [line.replace("|", " ").replace("`", " ").split() for line in text.splitlines()]
    return next(row for row in rows if row[:1] == [key])


# --- read_metrics


def test_read_metrics_round_trip(tmp_path):
    history = _history()
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in history) + "\n")  # a blank line is fine
    assert read_metrics(path) == history


def test_truncated_last_line_is_dropped(tmp_path):
    history = _history()
    lines = [json.dumps(record) for record in history]
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(("\n".join(lines) + "\n" + lines[1][:17]).encode())
    assert read_metrics(path) == history
    # Cut inside a multi-byte character: still only that line is lost.
    path.write_bytes(("\n".join(lines) + "\n").encode() + '{"type": "train", "note": "é'.encode()[:-1])
    assert read_metrics(path) == history


def test_corrupt_line_raises_with_its_number(tmp_path):
    lines = [json.dumps(record) for record in _history()]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join([*lines[:2], lines[2][:10], *lines[3:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: "):
        read_metrics(path)
    # A finished (newline-terminated) last line that does not parse is corruption, not a crash.
    path.write_text("\n".join([*lines, "{oops"]) + "\n")
    with pytest.raises(ValueError, match=rf":{len(lines) + 1}: "):
        read_metrics(path)
    path.write_text("\n".join([lines[0], "[1, 2]"]) + "\n")
    with pytest.raises(ValueError, match=r":2: expected a JSON object"):
        read_metrics(path)


# --- tables


def test_metrics_table_numbers_and_change():
    table = metrics_table(BEFORE, AFTER)
    assert table.splitlines()[0].split() == ["metric", "before", "after", "change"]
    assert _row(table, "forget/qa_accuracy") == ["forget/qa_accuracy", "1.000", "0.100", "-0.900"]
    assert _row(table, "retain/qa_accuracy") == ["retain/qa_accuracy", "0.980", "0.950", "-0.030"]
    assert _row(table, "mia_min_k") == ["mia_min_k", "0.900", "0.520", "-0.380"]
    # A p-value below 0.001 in scientific notation; PrivLeak (a percentage) with 4 significant digits.
    assert _row(table, "forget_quality") == ["forget_quality", "2.50e-12", "0.200", "+0.200"]
    assert _row(table, "privleak") == ["privleak", "-99.50", "3.000", "+102.5"]
    assert _row(table, "my/own") == ["my/own", "n/a", "7.000", "n/a"]  # an unregistered key: a plain number
    assert _row(table, "forget/loss") == ["forget/loss", "1.250", "12.50", "+11.25"]
    assert _row(table, "holdout/loss") == ["holdout/loss", "5.000", "5.100", "+0.1000"]
    assert _row(table, "forget/perplexity") == ["forget/perplexity", "3.490", "inf", "inf"]
    assert _row(table, "retain/loss") == ["retain/loss", "n/a", "0.5000", "n/a"]  # present on one side only
    # The registry's order: forget (headline numbers first), retain, privacy, holdout; unregistered keys last.
    order = [line.split()[0] for line in table.splitlines()[2:]]
    assert order == ["forget/qa_accuracy", "forget_quality", "forget/loss", "forget/perplexity", "retain/qa_accuracy",
                     "retain/loss", "mia_min_k", "privleak", "holdout/loss", "my/own"]


def test_metrics_table_skips_absent_keys_and_shows_nan():
    table = metrics_table({"forget/loss": math.nan, "retain/loss": 2.0}, {"forget/loss": 1.0, "retain/loss": None},
                          keys=["retain/loss", "forget/loss", "holdout/loss"])
    assert "holdout" not in table
    assert [line.split()[0] for line in table.splitlines()[2:]] == ["retain/loss", "forget/loss"]
    assert _row(table, "forget/loss") == ["forget/loss", "nan", "1.000", "nan"]
    assert _row(table, "retain/loss") == ["retain/loss", "2.000", "nan", "nan"]  # null is how JSON carries NaN


def test_markdown_report():
    text = markdown_report(CONFIG, BEFORE, AFTER, SUMMARY)
    assert text.startswith("# ")
    assert "| metric | before | after | change |" in text
    assert _row(text, "forget/qa_accuracy") == ["forget/qa_accuracy", "1.000", "0.100", "-0.900"]
    assert _row(text, "forget/loss") == ["forget/loss", "1.250", "12.50", "+11.25"]
    for line in ("- model: `embedded`", "- objective: `npo`", "- optimizer.name: `hybrid`", "- optimizer.lr: `1e-05`",
                 "- seed: `3`", "- steps: 6", "- seconds: 3.000", "- steps/s: 2.000"):
        assert line in text.splitlines(), line
    assert "How to read this" in text and "Forget quality" in text and "privleak" in text
    assert "holdout/perplexity" not in text
    assert "No evaluation before" not in text


def test_markdown_report_says_when_nothing_before_was_recorded():
    text = markdown_report(CONFIG, {}, AFTER, SUMMARY)
    assert "No evaluation before unlearning was recorded" in text
    assert _row(text, "forget/qa_accuracy") == ["forget/qa_accuracy", "n/a", "0.100", "n/a"]  # not "no change"


# --- plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0


def test_plot_run_writes_two_pngs(tmp_path):
    pyplot_loaded = "matplotlib.pyplot" in sys.modules
    paths = plot_run(_history(), tmp_path / "plots")
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_loaded  # pyplot (the user's backend) is never touched
    assert [path.name for path in paths] == ["loss.png", "metrics.png"]
    for path in paths:
        _assert_png(path)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["loss.png", "metrics.png"]


def test_plot_run_without_evals_writes_only_the_loss_plot(tmp_path):
    history = [{**record, "phase": None} for record in _history(evals=False)]
    assert [path.name for path in plot_run(history, tmp_path)] == ["loss.png"]
    _assert_png(tmp_path / "loss.png")
    assert not (tmp_path / "metrics.png").exists()
    assert plot_run([], tmp_path / "empty") == []


# --- write_report


def test_write_report(tmp_path):
    paths = write_report(tmp_path, config=CONFIG, before=BEFORE, after={**AFTER, "holdout/loss": math.nan},
                         history=_history(), summary=SUMMARY)
    assert set(paths) == {"json", "markdown", "loss_plot", "metrics_plot"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.png", "report.json", "report.md"]
    report = json.loads(paths["json"].read_text())
    assert set(report) == {"config", "before", "after", "change", "summary"}
    assert report["config"] == CONFIG and report["summary"] == SUMMARY and report["before"] == BEFORE
    assert report["after"]["forget/perplexity"] is None and report["after"]["holdout/loss"] is None
    assert report["after"]["retain/loss"] == 0.5
    assert report["change"]["forget/qa_accuracy"] == pytest.approx(-0.9)
    assert report["change"]["forget/loss"] == pytest.approx(11.25)
    assert report["change"]["holdout/loss"] is None and "retain/loss" not in report["change"]
    markdown = paths["markdown"].read_text()
    assert _row(markdown, "mia_min_k") == ["mia_min_k", "0.900", "0.520", "-0.380"]
    assert "(loss.png)" in markdown and "(metrics.png)" in markdown
    for name in ("loss_plot", "metrics_plot"):
        _assert_png(paths[name])
