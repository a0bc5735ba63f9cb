"""Run every benchmarks/bench_*.py on the machine at hand and store the JSON under
benchmarks/results/<machine>/<UTC time>_<commit>.json.

    PYTHONPATH=benchmarks python -m srdiff_bench.run [--quick] [pytest args, e.g. -k gradcam]

--quick keeps one shape per suite and few rounds (a smoke run, e.g. gpu.sh --cpu); its JSON is
marked ``quick`` and the report prefers full runs.
"""

import datetime
import os
import subprocess
import sys

import pytest

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")  # benchmarks/results


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "nogit"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--quick" in args:
        args.remove("--quick")
        os.environ["SRDIFF_BENCH_QUICK"] = "1"
    os.environ.pop("TRITON_INTERPRET", None)
    from srdiff_bench.conftest import machine_label  # after the environment is settled

    out_dir = os.path.join(RESULTS, machine_label())
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = os.path.join(out_dir, f"{stamp}_{_commit()}.json")
    here = os.path.dirname(os.path.abspath(__file__))
    code = pytest.main(
        [here, "-o", "python_files=bench_*.py", "-p", "no:cacheprovider", "-q",
         f"--benchmark-json={out}", "--benchmark-sort=name", "--benchmark-columns=median,iqr,rounds"] + args
    )
    print(f"benchmark results: {out}")
    return int(code)


if __name__ == "__main__":
    raise SystemExit(main())
