"""Prints the tables of benchmarks/README.md after a benchmark run, each ratio taken against a
baseline measured in the same run (zounlearn.bench's rows, ratios and tables): the perturbation
pass (GB/s, x the `add_` ceiling, speed-up vs the MeZO-style reference; per CPU build), the
ZO-SGD step (speed-up vs MeZO's loop), the first-order AdamW pass (speed-up vs torch's fused
AdamW), the steady-state peak memory of a step (x inference, and the excess as a share of the
parameter bytes), the memory model against it and the memory targets, half precision (drift,
learning, the exact mode's cost) and the Trainer path against our own loop (steps per second
and the memory each adds)."""

from __future__ import annotations

from collections import defaultdict

from zounlearn.bench import memory, steps, table
from zounlearn.bench.timing import Timing

SPEEDUP = table.Column("speed-up vs MeZO reference",
                       lambda r: "-" if r["speedup"] is None else f"{r['speedup']:.1f}", True)
PERTURB_COLUMNS = [table.PASSES[0], table.PASSES[2]._replace(header="kernel"), table.PASSES[4]._replace(
    cell=lambda r: f"{r['ms']:.2f}"), table.PASSES[5], table.PASSES[6]._replace(header="x add_ bandwidth"), SPEEDUP]
STEP_COLUMNS = [table.STEPS[0], table.STEPS[2]._replace(header="implementation"), table.STEPS[3]._replace(
    cell=lambda r: f"{r['ms']:.1f}"), SPEEDUP]


def _rows(benches) -> list[dict]:
    rows = []
    for bench in benches:
        timing = Timing(tuple(bench.stats.data))
        rows.append({**bench.extra_info, "ms": timing.median * 1e3, "seconds": timing.median})
    return rows


def _with_speedup(rows: list[dict], reference: str) -> list[dict]:
    base = {r["case"]: r["seconds"] for r in rows if r["kind"] == reference}
    return [{**r, "speedup": base[r["case"]] / r["seconds"] if r["case"] in base else None} for r in rows]


def _perturb_table(benches) -> str:
    rows = _with_speedup(_rows(benches), "MeZO reference")
    for r in rows:
        r["gbps"] = r["bytes"] / r["seconds"] / 1e9
    ceiling = {r["case"]: r["gbps"] for r in rows if r["kind"] == "add_ ceiling"}
    for r in rows:
        r["x_add"] = r["gbps"] / ceiling[r["case"]] if r["case"] in ceiling else None
    return table.markdown(rows, PERTURB_COLUMNS)


def _step_table(benches) -> str:
    return table.markdown(_with_speedup(_rows(benches), steps.MEZO), STEP_COLUMNS)


def _memory_table(benches) -> str:
    rows = [dict(b.extra_info) for b in benches]
    memory.add_ratios(rows)
    return table.markdown(rows, table.MEMORY)


def _measured_table(benches, columns: list[str]) -> str:
    """Values a benchmark measured (not timed), one row per case and kind, as extra_info holds them."""
    lines = ["| case | kind | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for bench in benches:
        info = bench.extra_info
        lines.append(f"| {info['case']} | {info['kind']} | " + " | ".join(f"{info[c]:.3g}" for c in columns) + " |")
    return "\n".join(lines)


def _drift_table(benches) -> str:
    return _measured_table(benches, [f"{m}@{n}" for m in ("rms", "changed") for n in (1, 100, 1000)])


def _learning_table(benches) -> str:
    return _measured_table(benches, [f"loss@{n}" for n in (0, 300, 1000, 3000)])


def _exact_cost_table(benches) -> str:
    rows = _rows(benches)
    base = next((r["seconds"] for r in rows if r["kind"] == "in_place"), None)
    lines = ["| case | perturbation | median ms | x in place |", "|---|---|---:|---:|"]
    for r in rows:
        ratio = f"{r['seconds'] / base:.3f}" if base else "-"
        lines.append(f"| {r['case']} | {r['kind']} | {r['ms']:.1f} | {ratio} |")
    return "\n".join(lines)


def _memory_rows_table(benches) -> str:
    rows = [row for b in benches for row in b.extra_info["rows"]]
    return table.markdown(rows, table.MEMORY)


def _hf_table(benches) -> str:
    rows: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in benches:
        rows[bench.extra_info["optimizer"]][bench.extra_info["path"]] = bench.extra_info
    lines = ["| optimizer | loop steps/s | Trainer steps/s | Trainer / loop speed | loop added MiB | "
             "Trainer added MiB |", "|---|---:|---:|---:|---:|---:|"]
    for name, paths in rows.items():
        loop, trainer = paths.get("loop"), paths.get("trainer")
        if loop and trainer:
            lines.append(f"| {name} | {loop['steps_per_second']:.2f} | {trainer['steps_per_second']:.2f} | "
                  f"{trainer['steps_per_second'] / loop['steps_per_second']:.2f} | {loop['added_bytes'] / 2**20:.0f} | "
                  f"{trainer['added_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def _first_order_table(benches) -> str:
    times = {b.extra_info["kind"]: b.stats.median for b in benches}
    fused = times.get("torch AdamW (fused)")
    lines = ["| case | implementation | median ms | speed-up vs torch AdamW (fused) |", "|---|---|---:|---:|"]
    for bench in benches:
        seconds = times[bench.extra_info["kind"]]
        speedup = f"{fused / seconds:.2f}" if fused else "-"
        lines.append(f"| {bench.extra_info['case']} | {bench.extra_info['kind']} | {seconds * 1e3:.2f} | {speedup} |")
    return "\n".join(lines)


def _steady_memory_table(benches) -> str:
    M, lines = 2**20, []
    by_size: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in benches:
        by_size[bench.extra_info["size"]][bench.extra_info["kind"]] = bench.extra_info
    for size, rows in by_size.items():
        base = rows.get("inference")
        lines.append(f"GPT-2 {size}: steady-state peak (MiB held by the model and the optimizer, runtime excluded)")
        lines.append("| kind | peak MiB | x inference | excess over inference, % of parameter bytes | state MiB "
              "| gradients held at once, MiB | saved activations MiB |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for kind, info in rows.items():
            net = info["net_bytes"]
            ratio = f"{net / base['net_bytes']:.3f}" if base else "-"
            excess = f"{100 * (net - base['net_bytes']) / info['param_bytes']:.1f}" if base else "-"
            lines.append(f"| {kind} | {net / M:.0f} | {ratio} | {excess} | {info['state_bytes'] / M:.0f} "
                  f"| {info['grad_peak_bytes'] / M:.0f} | {info.get('saved_bytes', 0) / M:.0f} |")
        lines.append("")
    return "\n".join(lines)


def _model_table(benches) -> str:
    M, lines = 2**20, []
    lines.append("| model | kind | measured MiB | predicted MiB | error |")
    lines.append("|---|---|---:|---:|---:|")
    for bench in benches:
        info = bench.extra_info
        measured, predicted = info["net_bytes"], info["predicted_bytes"]
        lines.append(f"| GPT-2 {info['size']} | {info['kind']} | {measured / M:.0f} | {predicted / M:.0f} "
              f"| {100 * (predicted / measured - 1):+.1f}% |")
    return "\n".join(lines)


def _target_table(benches) -> str:
    lines = []
    lines.append("| target | model | value | limit | met |")
    lines.append("|---|---|---:|---:|---|")
    for bench in benches:
        info = bench.extra_info
        met = info.get("met", info["value"] <= info["limit"])  # a target with a resolution decides it itself
        note = f" ({info['note']})" if info.get("note") else ""
        lines.append(f"| {info['target']} | GPT-2 {info['size']} | {info['value']:.3f} | {info['limit']:.2f} "
                     f"| {'yes' if met else 'no'}{note} |")
    return "\n".join(lines)


TABLES = {"first-order": _first_order_table,
          "perturb": _perturb_table, "step": _step_table, "memory": _memory_table, "drift": _drift_table,
          "learning": _learning_table, "exact-cost": _exact_cost_table, "memory-rows": _memory_rows_table,
          "hf": _hf_table, "steady-memory": _steady_memory_table, "model": _model_table, "target": _target_table}


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    by_table = defaultdict(list)
    for bench in session.benchmarks:
        by_table[bench.extra_info["table"]].append(bench)
    for name, benches in by_table.items():
        terminalreporter.write_line("")
        for line in TABLES[name](benches).splitlines():
            terminalreporter.write_line(line)
