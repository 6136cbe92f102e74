"""Prints the tables of benchmarks/README.md after a benchmark run, each ratio taken against a
baseline measured in the same run: the perturbation pass (GB/s, x the `add_` ceiling, speed-up
vs the MeZO-style reference), the ZO-SGD step (speed-up vs MeZO's loop), the steady-state peak
memory (x inference, the excess as a share of the parameter bytes), the memory model against it,
and the memory targets."""

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


def _memory_table(write, benches) -> None:
    M = 2**20
    by_size: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in benches:
        by_size[bench.extra_info["model"]][bench.extra_info["kind"]] = bench.extra_info
    for size, rows in by_size.items():
        base = rows.get("inference")
        write(f"GPT-2 {size}: steady-state peak (MiB held by the model and the optimizer, runtime excluded)")
        write("| kind | peak MiB | x inference | excess over inference, % of parameter bytes | state MiB "
              "| gradients held at once, MiB | saved activations MiB |")
        write("|---|---:|---:|---:|---:|---:|---:|")
        for kind, info in rows.items():
            net = info["net_bytes"]
            ratio = f"{net / base['net_bytes']:.3f}" if base else "-"
            excess = f"{100 * (net - base['net_bytes']) / info['param_bytes']:.1f}" if base else "-"
            write(f"| {kind} | {net / M:.0f} | {ratio} | {excess} | {info['state_bytes'] / M:.0f} "
                  f"| {info['grad_peak_bytes'] / M:.0f} | {info.get('saved_bytes', 0) / M:.0f} |")
        write("")


def _model_table(write, benches) -> None:
    M = 2**20
    write("| model | kind | measured MiB | predicted MiB | error |")
    write("|---|---|---:|---:|---:|")
    for bench in benches:
        info = bench.extra_info
        measured, predicted = info["net_bytes"], info["predicted_bytes"]
        write(f"| GPT-2 {info['model']} | {info['kind']} | {measured / M:.0f} | {predicted / M:.0f} "
              f"| {100 * (predicted / measured - 1):+.1f}% |")


def _target_table(write, benches) -> None:
    write("| target | model | value | limit | met |")
    write("|---|---|---:|---:|---|")
    for bench in benches:
        info = bench.extra_info
        write(f"| {info['target']} | GPT-2 {info['size']} | {info['value']:.3f} | {info['limit']:.2f} "
              f"| {'yes' if info['value'] <= info['limit'] else 'no'} |")


TABLES = {"perturb": _perturb_table, "step": _step_table, "memory": _memory_table, "model": _model_table,
          "target": _target_table}


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
