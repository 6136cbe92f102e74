"""Prints the tables of benchmarks/README.md after a benchmark run, each ratio taken against a
baseline measured in the same run: the perturbation pass (GB/s, x the `add_` ceiling, speed-up
vs the MeZO-style reference), the ZO-SGD step (speed-up vs MeZO's loop), the first-order AdamW
pass (speed-up vs torch's fused AdamW) and the peak memory of one step (x inference, and the
excess as a share of the parameter bytes)."""

from __future__ import annotations

from collections import defaultdict


def _perturb_table(write, benches) -> None:
    cases: dict[str, dict[str, tuple[float, int]]] = defaultdict(dict)
    for bench in benches:
        info = bench.extra_info
        cases[info["case"]][info["kind"]] = (bench.stats.median, info["bytes"])
    write("| case | kernel | median ms | GB/s | x add_ bandwidth | speed-up vs MeZO reference |")
    write("|---|---|---:|---:|---:|---:|")
    for case, kinds in cases.items():
        ceiling = kinds.get("add_ ceiling")
        mezo = kinds.get("MeZO reference")
        for kind, (seconds, nbytes) in kinds.items():
            bw = f"{ceiling[0] / seconds:.2f}" if ceiling else "-"
            speedup = f"{mezo[0] / seconds:.1f}" if mezo else "-"
            write(f"| {case} | {kind} | {seconds * 1e3:.2f} | {nbytes / seconds / 1e9:.2f} | {bw} | {speedup} |")


def _step_table(write, benches) -> None:
    cases: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in benches:
        cases[bench.extra_info["case"]][bench.extra_info["kind"]] = bench.stats.median
    write("| case | implementation | median ms | speed-up vs MeZO reference |")
    write("|---|---|---:|---:|")
    for case, kinds in cases.items():
        mezo = kinds.get("MeZO reference")
        for kind, seconds in kinds.items():
            write(f"| {case} | {kind} | {seconds * 1e3:.1f} | {f'{mezo / seconds:.1f}' if mezo else '-'} |")


def _first_order_table(write, benches) -> None:
    times = {b.extra_info["kind"]: b.stats.median for b in benches}
    fused = times.get("torch AdamW (fused)")
    write("| case | implementation | median ms | speed-up vs torch AdamW (fused) |")
    write("|---|---|---:|---:|")
    for bench in benches:
        seconds = times[bench.extra_info["kind"]]
        speedup = f"{fused / seconds:.2f}" if fused else "-"
        write(f"| {bench.extra_info['case']} | {bench.extra_info['kind']} | {seconds * 1e3:.2f} | {speedup} |")


def _memory_table(write, benches) -> None:
    rows = {b.extra_info["kind"]: b.extra_info for b in benches}
    base = rows.get("inference")
    write("| step | peak MiB | x inference | excess over inference, % of parameter bytes |")
    write("|---|---:|---:|---:|")
    for kind, info in rows.items():
        peak = info["peak_bytes"]
        ratio = f"{peak / base['peak_bytes']:.3f}" if base else "-"
        excess = f"{100 * (peak - base['peak_bytes']) / info['param_bytes']:.2f}" if base else "-"
        write(f"| {kind} | {peak / 2**20:.0f} | {ratio} | {excess} |")


def _measured_table(write, benches, columns: list[str]) -> None:
    """Rows of values a benchmark measured (not timed): one per case and kind, as extra_info holds them."""
    write("| case | kind | " + " | ".join(columns) + " |")
    write("|---|---|" + "---:|" * len(columns))
    for bench in benches:
        info = bench.extra_info
        write(f"| {info['case']} | {info['kind']} | " + " | ".join(f"{info[c]:.3g}" for c in columns) + " |")


def _drift_table(write, benches) -> None:
    _measured_table(write, benches, [f"{m}@{n}" for m in ("rms", "changed") for n in (1, 100, 1000)])


def _learning_table(write, benches) -> None:
    _measured_table(write, benches, [f"loss@{n}" for n in (0, 300, 1000, 3000)])


def _exact_cost_table(write, benches) -> None:
    times = {b.extra_info["kind"]: b.stats.median for b in benches}
    write("| case | perturbation | median ms | x in place |")
    write("|---|---|---:|---:|")
    for bench in benches:
        kind = bench.extra_info["kind"]
        ratio = f"{times[kind] / times['in_place']:.3f}" if "in_place" in times else "-"
        write(f"| {bench.extra_info['case']} | {kind} | {times[kind] * 1e3:.1f} | {ratio} |")


TABLES = {"perturb": _perturb_table, "step": _step_table, "first-order": _first_order_table,
          "memory": _memory_table, "drift": _drift_table,
          "learning": _learning_table, "exact-cost": _exact_cost_table}


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    by_table = defaultdict(list)
    for bench in session.benchmarks:
        by_table[bench.extra_info["table"]].append(bench)
    for name, benches in by_table.items():
        terminalreporter.write_line("")
        TABLES[name](terminalreporter.write_line, benches)
