"""The measurements' rows as tables: aligned text for a terminal, Markdown for the docs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple


class Column(NamedTuple):
    header: str
    cell: Callable[[dict], str]
    numeric: bool  # right-aligned


def _num(header: str, key: str, spec: str, scale: float = 1.0) -> Column:
    return Column(header, lambda row: "-" if row.get(key) is None else format(row[key] * scale, spec), True)


def _int(header: str, key: str) -> Column:
    return Column(header, lambda row: str(row.get(key, "-")), True)


def _text(header: str, key: str) -> Column:
    return Column(header, lambda row: str(row.get(key, "")), False)


PASSES = [_text("case", "case"), _text("backend", "backend"), _text("pass", "kind"),
          _int("B/elem", "bytes_per_element"), _num("median ms", "ms", ".3f"), _num("GB/s", "gbps", ".1f"),
          _num("x add_", "x_add", ".2f"), _num("x copy_", "x_copy", ".2f")]
STEPS = [_text("case", "case"), _text("backend", "backend"), _text("step", "kind"), _num("median ms", "ms", ".2f"),
         _num("speed-up vs MeZO loop", "speedup", ".1f")]
MEMORY = [_text("step", "kind"), _num("net peak MiB", "net_bytes", ".0f", 2.0**-20),
          _num("x inference", "x_inference", ".3f"),
          _num("excess over inference, % of parameter bytes", "excess_pct", ".2f")]


def markdown(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    head = "| " + " | ".join(c.header for c in columns) + " |"
    rule = "|" + "|".join("---:" if c.numeric else "---" for c in columns) + "|"
    body = ["| " + " | ".join(c.cell(r) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def text(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    cells = [[c.header for c in columns]] + [[c.cell(r) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) if c.numeric else v.ljust(w) for v, w, c in zip(line, widths, columns))
                     .rstrip() for line in cells)
