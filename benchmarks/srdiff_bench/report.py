"""Turn the stored benchmark JSON into the README's performance section and PNG plots, and the
stored static sm_90 check (benchmarks/srdiff_bench/sass_sm90.py) into docs/attention.md's table.

    PYTHONPATH=benchmarks python -m srdiff_bench.report [--readme README.md] [--figures docs/figures]
                                [--attention-doc docs/attention.md]

For each machine under benchmarks/results/ and each op, the newest run that measured that op is
used (full runs before ``--quick`` ones). Every number in the tables comes from those files; the
section is rewritten between the README's ``<!-- BENCH:BEGIN -->`` / ``<!-- BENCH:END -->`` markers.
Ratios are peer time / srdiff time (> 1: srdiff is faster); in the training-step suite provider time
/ srdiff's base-phase step time, elsewhere without an srdiff provider / the first provider's time. "% of peak" compares GB/s with the copy
bandwidth and TFLOP/s with the matmul rate measured in the same run (bench_ceilings.py).
"""

import argparse
import glob
import json
import os
import re
from collections import defaultdict

BENCHMARKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ (this package is benchmarks/srdiff_bench/)
ROOT = os.path.dirname(BENCHMARKS)
RESULTS = os.path.join(BENCHMARKS, "results")
BEGIN, END = "<!-- BENCH:BEGIN -->", "<!-- BENCH:END -->"
STATIC_BEGIN, STATIC_END = "<!-- SM90:BEGIN -->", "<!-- SM90:END -->"
STATIC_DIR = "sm90-static"  # under the results folder: benchmarks/srdiff_bench/sass_sm90.py's records, not runs
OURS = "srdiff"


def read_jsonl_run(path: str) -> dict:
    """One run from the JSON lines that ``SRDIFF_BENCH_JSONL`` collects (benchmarks/srdiff_bench/conftest.py), in
    the shape of a pytest-benchmark JSON: the first ``session`` line gives machine, commit and time,
    ``case`` lines the benchmarks, ``unavailable`` lines the reasons. A last line cut off by a kill is
    dropped; any other line that does not parse is an error."""
    with open(path) as f:
        lines = f.read().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}:{i + 1} is not a JSON line: {line[:80]!r}") from None
    sessions = [r for r in records if r.get("type") == "session"]
    if not sessions:
        raise ValueError(f"{path} has no session line: not a benchmark JSON-lines file")
    return {
        "machine_info": sessions[0]["machine_info"],
        "commit_info": {"id": sessions[0]["commit"]},
        "datetime": sessions[0]["datetime"],
        "benchmarks": [{"name": r["name"], "stats": r["stats"], "extra_info": r["extra_info"]}
                       for r in records if r.get("type") == "case"],
        "unavailable": [{k: v for k, v in r.items() if k not in ("type", "chunk")}
                        for r in records if r.get("type") == "unavailable"],
    }


def _merge(runs: list[dict]) -> dict:
    """One run from the chunks of one gpu.sh call: the first chunk's header, every chunk's rows."""
    merged = dict(runs[0])
    merged["benchmarks"] = [b for r in runs for b in r["benchmarks"]]
    merged["unavailable"] = [u for r in runs for u in r["unavailable"]]
    return merged


def load_runs(results_dir: str) -> list[dict]:
    """Every stored run: pytest-benchmark ``*.json``, and gpu.sh's ``*.jsonl`` where the chunks of one
    call (``<stamp>_<commit>_<chunk>.jsonl``, benchmarks/srdiff_bench/store.py) make one run."""
    runs, calls = [], defaultdict(list)
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "*.json*"))):
        if os.path.basename(os.path.dirname(path)) == STATIC_DIR:
            continue
        if path.endswith(".jsonl"):
            call = re.match(r"(\d{8}T\d{6}Z_[^_]+)_", os.path.basename(path))
            calls[os.path.join(os.path.dirname(path), call.group(1) if call else os.path.basename(path))].append(path)
            continue
        if not path.endswith(".json"):
            continue
        with open(path) as f:
            run = json.load(f)
        run["_path"] = os.path.relpath(path, ROOT)
        runs.append(run)
    for key, paths in calls.items():
        run = _merge([read_jsonl_run(p) for p in paths])
        run["_path"] = os.path.relpath(paths[0] if len(paths) == 1 else key + "_*.jsonl", ROOT)
        runs.append(run)
    return runs


def _ops(run: dict) -> set[str]:
    return {b["extra_info"]["op"] for b in run.get("benchmarks", []) if "op" in b.get("extra_info", {})} | {
        u["op"] for u in run.get("unavailable", [])
    }


def latest_by_machine_and_op(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """machine label -> op -> the run to report (newest full run, else newest quick run)."""
    chosen: dict[str, dict[str, dict]] = defaultdict(dict)
    for run in sorted(runs, key=lambda r: (not r["machine_info"].get("quick", False), r["datetime"])):
        for op in _ops(run):
            chosen[run["machine_info"]["label"]][op] = run
    return chosen


def _shape_label(shape: dict | None) -> str:
    if not shape:
        return ""
    return " ".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in shape.items())


def _case_key(info: dict) -> tuple:
    return (_shape_label(info.get("shape")), info.get("dtype") or "", info.get("mode") or "")


def _ceilings(run: dict | None) -> dict:
    """copy GB/s and matmul TFLOP/s per dtype measured in this run, if it ran bench_ceilings."""
    out = {}
    for b in ([] if run is None else run.get("benchmarks", [])):
        info = b["extra_info"]
        if info.get("op") != "ceilings":
            continue
        if "gbps" in info:
            out["gbps"] = info["gbps"]
        if "tflops" in info:
            out[("tflops", info["dtype"])] = info["tflops"]
    return out


def _ceilings_run(run: dict, newest_ceilings: dict | None) -> dict | None:
    """The run whose ceilings an op's "% of peak" uses: its own run if that measured them, else the
    machine label's newest ceilings run if it was on the same device (a label such as cpu-2core
    covers several CPU models), else none (the column shows –)."""
    if any(b["extra_info"].get("op") == "ceilings" for b in run.get("benchmarks", [])):
        return run
    if newest_ceilings is not None and newest_ceilings["machine_info"].get("device") == run["machine_info"].get("device"):
        return newest_ceilings
    return None


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def op_table(run: dict, op: str, ceilings: dict) -> tuple[list[str], list[str]]:
    """Markdown lines for one op on one machine, plus footnotes for unavailable providers."""
    cases: dict[tuple, dict[str, dict]] = defaultdict(dict)
    providers: list[str] = []
    for b in run.get("benchmarks", []):
        info = b["extra_info"]
        if info.get("op") != op:
            continue
        cases[_case_key(info)][info["provider"]] = info
        if info["provider"] not in providers:
            providers.append(info["provider"])
    notes: dict[tuple, dict[str, str]] = defaultdict(dict)
    for u in run.get("unavailable", []):
        if u["op"] == op:
            notes[_case_key(u)][u["provider"]] = u["reason"]
            if u["provider"] not in providers:
                providers.append(u["provider"])
    # Ratios are read against srdiff; in the training-step suite against srdiff's base-phase step
    # (lambda = 0), in other suites without an "srdiff" provider against the first provider run.
    base = next((p for p in (OURS, "base-baseline") if p in providers), providers[0])
    providers.sort(key=lambda p: (p != base, p))
    peers = [p for p in providers if p != base]

    header = ["shape", "dtype", "mode"] + [f"{p} (ms)" for p in providers]
    header += [f"{p} / {base}" for p in peers]
    header += [f"{base} throughput", "% of peak", f"{base} peak MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    footnotes: list[str] = []
    for key in sorted(set(cases) | set(notes)):
        row_cases, row_notes = cases.get(key, {}), notes.get(key, {})
        cells = list(key)
        for p in providers:
            if p in row_cases:
                cells.append(_fmt(row_cases[p]["median_ms"]))
            elif p in row_notes:
                if row_notes[p] not in footnotes:
                    footnotes.append(row_notes[p])
                cells.append(f"n/a [{footnotes.index(row_notes[p]) + 1}]")
            else:
                cells.append("–")
        ours = row_cases.get(base)
        for p in peers:
            peer = row_cases.get(p)
            cells.append(f"{peer['median_ms'] / ours['median_ms']:.2f}x" if ours and peer else "–")
        throughput, peak = "–", "–"
        if ours and "tflops" in ours:
            throughput = f"{ours['tflops']:.3g} TFLOP/s"
            ceiling = ceilings.get(("tflops", ours["dtype"]))
            peak = f"{100 * ours['tflops'] / ceiling:.0f}%" if ceiling else "–"
        elif ours and "gbps" in ours:
            throughput = f"{ours['gbps']:.3g} GB/s"
            peak = f"{100 * ours['gbps'] / ceilings['gbps']:.0f}%" if "gbps" in ceilings else "–"
        cells += [throughput, peak, _fmt(ours.get("peak_memory_mb")) if ours else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines, [f"[{i + 1}] {n}" for i, n in enumerate(footnotes)]


def plot_op(run: dict, op: str, path: str) -> bool:
    """Bars of throughput (TFLOP/s, GB/s, or calls/s) per case and provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [b["extra_info"] for b in run.get("benchmarks", []) if b["extra_info"].get("op") == op]
    if not rows:
        return False
    metric = "tflops" if all("tflops" in r for r in rows) else "gbps" if all("gbps" in r for r in rows) else None
    label = {"tflops": "TFLOP/s", "gbps": "GB/s", None: "calls per second"}[metric]
    cases = sorted({_case_key(r) for r in rows})
    providers = sorted({r["provider"] for r in rows}, key=lambda p: (p != OURS, p))
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cases) + 2), 4))
    for i, p in enumerate(providers):
        values = []
        for c in cases:
            r = next((r for r in rows if _case_key(r) == c and r["provider"] == p), None)
            values.append(0 if r is None else (r[metric] if metric else 1e3 / r["median_ms"]))
        ax.bar([x + i * width for x in range(len(cases))], values, width, label=p)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))])
    ax.set_xticklabels(["\n".join(filter(None, c)) for c in cases], fontsize=7)
    ax.set_ylabel(label)
    info = run["machine_info"]
    ax.set_title(f"{op} on {info['device']} ({run['datetime'][:10]})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def machine_is_gpu(info: dict) -> bool:
    return not str(info.get("device", "")).startswith("CPU")


def render(chosen: dict[str, dict[str, dict]], figures_dir: str) -> str:
    out = [BEGIN, "", "_Generated by `PYTHONPATH=benchmarks python -m srdiff_bench.report` from `benchmarks/results/`; do not edit by hand._", ""]
    machines = sorted(chosen, key=lambda m: (m.startswith("cpu"), m))  # GPUs first
    if not any(machine_is_gpu(run["machine_info"]) for by_op in chosen.values() for run in by_op.values()):
        out += ["No GPU results are stored yet: no GPU has been lent to this project. `benchmarks/gpu.sh` "
                "measures every suite below on one; its tables will stand beside the CPU ones.", ""]
    ops = sorted({op for by_op in chosen.values() for op in by_op if op != "ceilings"})
    for op in ops:  # each op's GPU and CPU tables one after the other
        for machine in (m for m in machines if op in chosen[m]):
            by_op = chosen[machine]
            run = by_op[op]
            info = run["machine_info"]
            ceilings = _ceilings(_ceilings_run(run, by_op.get("ceilings")))
            versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "triton", "cuda", "driver") if info.get(k))
            quick = " (quick run)" if info.get("quick") else ""
            out += [f"#### {op} on {info['device']}{quick}", "",
                    f"{run['datetime'][:16].replace('T', ' ')} UTC, commit {run['commit_info'].get('id', '?')[:8]}, "
                    f"{versions}; data: `{run['_path']}`", ""]
            lines, notes = op_table(run, op, ceilings)
            out += lines + [""]
            if not machine_is_gpu(info):
                notes.append("CPU memory: growth of the process's peak resident set during one call "
                             "(memory the allocator reuses from earlier calls does not show).")
            if notes:
                out += [n + "  " for n in notes] + [""]
            fig = os.path.join(figures_dir, f"bench_{machine}_{op}.png")
            if plot_op(run, op, fig):
                out += [f"![{op} on {machine}]({os.path.relpath(fig, ROOT)})", ""]
    return "\n".join(out + [END])


def load_static(results_dir: str) -> list[dict]:
    """The stored static sm_90 checks, oldest first."""
    records = []
    for path in glob.glob(os.path.join(results_dir, STATIC_DIR, "*.json")):
        with open(path) as f:
            records.append({**json.load(f), "_path": os.path.relpath(path, ROOT)})
    return sorted(records, key=lambda r: r["datetime"])


def _config_label(config: dict) -> str:
    label = f"{config['BLOCK_M']}x{config['BLOCK_N']} w{config['num_warps']} s{config['num_stages']}"
    return label + (f" r{config['maxnreg']}" if config.get("maxnreg") else "")


def _static_pairs(record: dict) -> dict[tuple, dict]:
    """(kernel, D, config label) -> {"off": row, "fam": row}, in the record's (kept-config) order."""
    pairs: dict[tuple, dict] = {}
    for row in record["rows"]:
        key = (row["kernel"], row["D"], _config_label(row["config"]))
        pairs.setdefault(key, {})["fam" if row["modulated"] else "off"] = row
    return {key: pair for key, pair in pairs.items() if len(pair) == 2}


def _spills(row: dict) -> str:
    """Spill stores in the kernel, and spill stores and loads in its main loop where recorded."""
    if "loop_spills" not in row:
        return str(row["spill_stores"])
    return f"{row['spill_stores']} ({row['loop_spills']})"


def _loop_ratio(pair: dict) -> float:
    return pair["fam"]["main_loop"]["total"] / pair["off"]["main_loop"]["total"]


def _largest_ratios(record: dict) -> str:
    """Modulated / unmodulated main-loop instructions of each kernel and head dim's largest kept config."""
    first: dict[tuple, tuple] = {}
    for (kernel, D, label), pair in _static_pairs(record).items():
        first.setdefault((kernel, D), (label, _loop_ratio(pair)))
    return ", ".join(f"{kernel} D={D} {label}: {ratio:.2f}x" for (kernel, D), (label, ratio) in first.items())


def render_static(records: list[dict]) -> str:
    """docs/attention.md's table of the newest static check, and the largest configs' ratios in the
    oldest stored check next to the newest."""
    out = [STATIC_BEGIN, "", "_Generated by `PYTHONPATH=benchmarks python -m srdiff_bench.report` from `benchmarks/results/"
           f"{STATIC_DIR}/` (written by `PYTHONPATH=benchmarks python -m srdiff_bench.sass_sm90`); do not edit by hand._", ""]
    if not records:
        out += ["No static check is stored yet: `PYTHONPATH=benchmarks python -m srdiff_bench.sass_sm90` writes one.", ""]
        return "\n".join(out + [STATIC_END])
    new = records[-1]
    out += [f"{new['dtype']}, {new['target']}, Triton {new['triton']}, commit {new['commit']}; data: "
            f"`{new['_path']}`. Main loop = the loop over full key (forward, dQ) or query (dK/dV) blocks, "
            "instructions per warp and iteration, unmodulated / modulated; registers a thread, spill "
            "stores (STL) in the whole kernel (in parentheses: spill stores and loads in the main loop) and "
            "CTAs per SM likewise.", ""]
    header = ["kernel", "D", "config", "main loop", "fam / off", "MMA (fam)", "FMUL", "FFMA", "HFMA2", "MUFU",
              "loads", "barriers", "integer", "uniform", "registers", "STL", "CTAs/SM"]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (kernel, D, label), pair in _static_pairs(new).items():
        off, fam = pair["off"], pair["fam"]

        def both(get) -> str:
            return f"{get(off)} / {get(fam)}"

        def cls(name):
            return both(lambda r: r["main_loop"]["classes"].get(name, 0))

        shapes = ", ".join(f"{n}x {shape.split('.')[1]}"
                           for shape, n in fam["main_loop"]["mma_shapes"].items())
        out.append("| " + " | ".join([
            kernel, str(D), label, both(lambda r: r["main_loop"]["total"]), f"{_loop_ratio(pair):.2f}x",
            shapes,
            cls("fmul"), cls("ffma"), cls("half"), cls("mufu"), cls("loads"), cls("barriers"), cls("integer"),
            cls("uniform"), both(lambda r: r["registers"]),
            both(_spills),
            both(lambda r: r["ctas"])]) + " |")
    out.append("")
    if len(records) > 1:
        old = records[0]
        out += [f"Largest kept config, modulated / unmodulated main loop: commit {old['commit']} "
                f"(`{old['_path']}`): {_largest_ratios(old)}; commit {new['commit']}: "
                f"{_largest_ratios(new)}.", ""]
    return "\n".join(out + [STATIC_END])


def _replace_section(path: str, begin: str, end: str, section: str) -> None:
    with open(path) as f:
        text = f.read()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    with open(path, "w") as f:
        f.write(head + section + rest.split(end, 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    parser.add_argument("--figures", default=os.path.join(ROOT, "docs", "figures"))
    parser.add_argument("--attention-doc", help="the static sm_90 table's page (default: docs/attention.md)")
    args = parser.parse_args(argv)
    section = render(latest_by_machine_and_op(load_runs(args.results)), args.figures)
    _replace_section(args.readme, BEGIN, END, section)
    print(f"wrote the performance section of {args.readme}")
    doc = args.attention_doc or os.path.join(ROOT, "docs", "attention.md")
    if os.path.exists(doc):
        _replace_section(doc, STATIC_BEGIN, STATIC_END, render_static(load_static(args.results)))
        print(f"wrote the static sm_90 table of {doc}")
    else:
        print(f"no {doc}: the static sm_90 table is not rendered")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
