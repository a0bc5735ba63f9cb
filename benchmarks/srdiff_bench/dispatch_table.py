"""Write the table srdiff.fam_attention's dispatch reads on CUDA from the stored GPU benchmarks.

    PYTHONPATH=benchmarks python -m srdiff_bench.dispatch_table [--results benchmarks/results] [--out srdiff/attention_dispatch.json]

For each GPU machine, the newest run of benchmarks/srdiff_bench/bench_attention.py (as the report picks it) gives,
per case (dtype, head dim D, sequence length N, direction fwd or fwd+bwd), the median time and the
peak memory of both paths forced: ``srdiff-fused`` (backend "triton") and ``srdiff-sdpa`` (backend
"sdpa"). Each case where both ran becomes one ``measured`` entry naming the faster path; machines of
the same compute capability are merged, the newest run first. The ``default`` (the path where nothing
was measured, and its basis) is kept from the existing table. Nothing here is typed by hand.
"""

import argparse
import json
import os

from srdiff_bench.report import RESULTS, ROOT, latest_by_machine_and_op, load_runs, machine_is_gpu
from srdiff_bench.store import write_json

OP = "fam_attention"
PATHS = {"srdiff-fused": "triton", "srdiff-sdpa": "sdpa"}
TABLE = os.path.join(ROOT, "srdiff", "attention_dispatch.json")


def measured_entries(results: str) -> list[dict]:
    """One entry per GPU case where both paths ran, newest run first."""
    entries, seen = [], set()
    runs = [by_op[OP] for by_op in latest_by_machine_and_op(load_runs(results)).values() if OP in by_op]
    for run in sorted(runs, key=lambda r: r["datetime"], reverse=True):
        info = run["machine_info"]
        if not machine_is_gpu(info) or not info.get("capability"):
            continue
        cases: dict[tuple, dict] = {}
        for b in run["benchmarks"]:
            case = b["extra_info"]
            if case.get("op") == OP and case["provider"] in PATHS:
                key = (case["dtype"], case["shape"]["D"], case["shape"]["N"], case["mode"])
                cases.setdefault(key, {})[PATHS[case["provider"]]] = case
        for (dtype, D, N, mode), paths in sorted(cases.items()):
            if len(paths) < 2 or (info["capability"], dtype, D, N, mode) in seen:
                continue
            seen.add((info["capability"], dtype, D, N, mode))
            entry = {"capability": info["capability"], "device": info["device"], "dtype": dtype, "D": D,
                     "N": N, "mode": mode, "commit": run["commit_info"].get("id", "?")[:8],
                     "data": run["_path"]}
            for path, case in paths.items():
                entry[f"{path}_ms"] = case["median_ms"]
                entry[f"{path}_peak_mb"] = case.get("peak_memory_mb")
            entry["faster"] = min(PATHS.values(), key=lambda p: entry[f"{p}_ms"])
            entries.append(entry)
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--out", default=TABLE)
    args = parser.parse_args(argv)
    with open(args.out) as f:
        table = json.load(f)
    table["measured"] = measured_entries(args.results)
    write_json(args.out, table)
    print(f"wrote {len(table['measured'])} measured entries to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
