"""summary.md and summary.json of a `make gpu-check` run, from the stages' result.json files."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from zounlearn.atomic import write_json, write_text
from zounlearn.bench import table


def _tests(title: str, r: dict) -> list[str]:
    lines = [f"## {title}", "", f"{r.get('passed', 0)} passed, {r.get('failed', 0)} failed, {r.get('errors', 0)} "
             f"errors, {r.get('skipped', 0)} skipped in {r.get('shards', '?')} processes"
             + (f"; cut off: {', '.join(r['cut_off'])}" if r.get("cut_off") else "") + ".", ""]
    if r.get("max_abs_error"):
        lines += ["| backend op dist | tests | max abs error vs the reference |", "|---|---:|---:|"]
        lines += [f"| {group} | {g['tests']} | {g['max_abs_error']:.3g} |" for group, g in r["max_abs_error"].items()]
        lines.append("")
    lines += [f"- FAILED {f['test']}: {f['message']}" for f in r.get("failures", [])[:20]]
    return lines + [""]


def _by_case(rows: list[dict], columns) -> list[str]:
    cases = defaultdict(list)
    for row in rows:
        cases[row.get("case", "")].append(row)
    lines = []
    for case, group in cases.items():
        lines += [f"**{case}** ({group[0]['numel']:,} elements in {group[0]['tensors']} tensors)", "",
                  table.markdown(group, columns[1:]), ""]
    return lines


def write_summary(out: Path, results: dict[str, dict], dry_run: bool) -> str:
    env = results.get("env", {})
    gpu = env.get("gpu", {})
    where = f"{gpu['name']} ({gpu['sms']} SMs, {gpu['memory_gib']:.0f} GiB)" if gpu else "no GPU (CPU)"
    dry = " --dry-run (tiny sizes on the CPU: no figure here is a GPU figure)" if dry_run else ""
    lines = [f"# make gpu-check{dry}",
             "", f"{where}; torch {env.get('torch')}, triton {env.get('triton')}, python {env.get('python')}, "
             f"{env.get('cpus')} CPUs ({env.get('cpu')}); commit {env.get('git_commit')}", "",
             "| stage | status | seconds | cap |", "|---|---|---:|---:|"]
    lines += [f"| {name} | {r['status']}{' (cut by the budget)' if r.get('cut_by_budget') else ''} | "
              f"{r.get('wall_seconds', 0):.1f} | {r['cap']:.0f} |" for name, r in results.items()]
    lines.append("")
    for name, r in results.items():
        if r.get("error"):
            lines += [f"**{name}**: {r['error']} (see {name}/log.txt)", ""]
    if "build" in results:
        b = results["build"]
        lines += ["## Build", "", f"`{b.get('command')}` with TORCH_CUDA_ARCH_LIST={b.get('TORCH_CUDA_ARCH_LIST')}, "
                  f"MAX_JOBS={b.get('MAX_JOBS')}, setuptools {b.get('setuptools')}, "
                  f"ninja {'found' if b.get('ninja') else 'NOT found (serial build)'}: "
                  f"exit status {b.get('exit_status')} in {b.get('seconds', 0):.0f} s; {b.get('imports')}: "
                  f"{'ok' if b.get('imports_ok') else 'FAILED'}", ""]
        if b.get("status") != "ok":
            lines += ["```", (b.get("tail") or "") + (b.get("import_error") or ""), "```", ""]
    if "env" in results:
        lines += ["## Backends", ""] + [f"- {k}: {v}" for k, v in env.get("backends", {}).items()] + [""]
    if "correctness" in results:
        lines += _tests("Correctness against the reference (tests/test_gpu_paths.py)", results["correctness"])
    bandwidth = results.get("bandwidth", {})
    if bandwidth.get("rows") or bandwidth.get("errors"):
        lines += ["## Bandwidth of one pass (GB/s of the bytes the pass must move; x add_ / x copy_ over the same "
                  "bytes as one tensor)", ""] + _by_case(bandwidth.get("rows", []), table.PASSES)
        lines += [f"- ERROR {e['backend']} {e['kind']} ({e['case']}): {e['error'][:300]}"
                  for e in bandwidth.get("errors", [])]
        lines += [f"- prewarm: {e[:300]}" for e in bandwidth.get("prewarm_errors", [])] + [""]
    if results.get("step", {}).get("rows"):
        lines += ["## ZO-SGD step against MeZO's loop", ""] + _by_case(results["step"]["rows"], table.STEPS)
    if results.get("memory", {}).get("rows"):
        m = results["memory"]
        lines += [f"## Steady-state peak memory ({m['model']}, batch {m['batch'][0]}x{m['batch'][1]}, "
                  f"{m['rows'][0]['dtype']})", "", table.markdown(m["rows"], table.MEMORY), ""]
    if "tests" in results:
        lines += _tests("Op and optimizer tests", results["tests"])
    if "sanitizer" in results:
        s = results["sanitizer"]
        lines += ["## compute-sanitizer", ""]
        if s.get("runs"):
            lines += [f"- {check}: exit status {r['exit_status']}; {' '.join(r['summary'] or ['no summary line'])}"
                      for check, r in s["runs"].items()]
        elif s.get("note"):
            lines.append(f"- {s['note']}: " + "; ".join(s.get("ran", [])))
        else:
            lines.append(f"- {s['status']}")
        lines.append("")
    text = "\n".join(lines)
    write_text(out / "summary.md", text + "\n")
    write_json(out / "summary.json", results)
    return text
