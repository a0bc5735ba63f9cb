"""diffusers' own model tests as an external check of the FAM processors (not CI: minutes to hours).

Runs a diffusers checkout's model tests three times, each in its own pytest process, and compares the
outcome of every test:

* ``plain``: as diffusers ships them;
* ``swapped``: every diffusers model gets ``srdiff.set_fam_attn_processor(model, lam=0, strict=False)``
  at its first call (FAM processors and hook-path hooks in place, nothing modulated);
* ``active``: the same with ``lam`` (default the paper's 0.025), every call inside a
  ``fam_context`` with an all-zero map (s = 1 + lam * 0: the modulation path runs, the result should
  be the plain one within diffusers' own tolerances).

A test that passes plain and fails or errors swapped or active "fails only with srdiff": the count
that must be 0. Tests that fail plain (hub downloads offline, a checkout newer than the installed
diffusers) say nothing about srdiff and are counted apart. The summary (counts and the failing test
ids) is printed and written as JSON.

    PYTHONPATH=benchmarks python -m srdiff_bench.diffusers_model_tests --checkout /tmp/dt \\
        tests/models/transformers/test_models_dit_transformer2d.py --out runs/diffusers_tests.json

``--checkout`` is a folder holding diffusers' ``tests/`` tree (a clone, or
``git --git-dir=<diffusers>.git archive HEAD tests | tar -x -C DIR``). The same module is the pytest
plugin of the swapped and active runs (``-p srdiff_bench.diffusers_model_tests``; ``SRDIFF_TESTS_MODE``
and ``SRDIFF_TESTS_LAM`` select it).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

MODES = ("plain", "swapped", "active")
_MODE_ENV, _LAM_ENV = "SRDIFF_TESTS_MODE", "SRDIFF_TESTS_LAM"
_REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------- the pytest plugin

def pytest_configure(config):
    """Patch ``diffusers.ModelMixin.__call__`` for the run's mode (plain: leave it alone)."""
    mode = os.environ.get(_MODE_ENV, "plain")
    if mode == "plain":
        return
    import torch
    from diffusers import ModelMixin

    import srdiff

    lam = float(os.environ[_LAM_ENV]) if mode == "active" else 0.0
    call = ModelMixin.__call__

    def swapped_call(model, *args, **kwargs):
        if "_srdiff_tests_installed" not in model.__dict__:
            model.__dict__["_srdiff_tests_installed"] = True
            with warnings.catch_warnings():  # the skipped-layer and no-layer notices: expected here
                warnings.simplefilter("ignore")
                srdiff.set_fam_attn_processor(model, lam=lam, strict=False)
        if mode == "swapped":
            return call(model, *args, **kwargs)
        with warnings.catch_warnings(), srdiff.fam_context(torch.zeros(8, 8)):
            warnings.filterwarnings("ignore", message=r"mfam is 8x8 but the model's input is")
            return call(model, *args, **kwargs)

    ModelMixin.__call__ = swapped_call


# ------------------------------------------------------------------------------------- the runner

def _outcomes(junit: Path) -> dict[str, str]:
    """test id -> "passed" | "failed" | "skipped" from a pytest junit XML report."""
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        tags = {child.tag for child in case}
        outcomes[test_id] = ("failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags
                             else "passed")
    return outcomes


def run_mode(mode: str, checkout: Path, files: list[str], lam: float, extra: list[str]) -> dict[str, str]:
    """One pytest process over ``files`` in ``checkout`` with the plugin in ``mode``; the outcomes."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "report.xml"
        env = {**os.environ, _MODE_ENV: mode, _LAM_ENV: repr(lam),
               "PYTHONPATH": os.pathsep.join([str(_REPO), str(_REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")]),
               "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "srdiff_bench.diffusers_model_tests",
               "--continue-on-collection-errors", f"--junitxml={junit}", *extra, *files]
        start = time.monotonic()
        print(f"[{mode}] {' '.join(cmd[3:])}", flush=True)
        subprocess.run(cmd, cwd=checkout, env=env, stdout=subprocess.DEVNULL, check=False)
        if not junit.is_file():
            raise RuntimeError(f"pytest wrote no report in mode {mode!r}: run the command above in {checkout} to see why")
        outcomes = _outcomes(junit)
        print(f"[{mode}] {len(outcomes)} tests in {time.monotonic() - start:.0f} s", flush=True)
        return outcomes


def compare(results: dict[str, dict[str, str]]) -> dict:
    """Counts per mode and the tests that pass plain but fail with srdiff swapped in or active."""
    plain = results["plain"]
    summary = {"counts": {mode: {k: sum(v == k for v in out.values()) for k in ("passed", "failed", "skipped")}
                          for mode, out in results.items()}}
    for mode in MODES[1:]:
        summary[f"fail_only_{mode}"] = sorted(t for t, o in results[mode].items() if o == "failed" and plain.get(t) == "passed")
        summary[f"pass_only_{mode}"] = sorted(t for t, o in results[mode].items() if o == "passed" and plain.get(t) == "failed")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="test files or folders, relative to --checkout")
    parser.add_argument("--checkout", type=Path, required=True, help="folder holding diffusers' tests/ tree")
    parser.add_argument("--lam", type=float, default=0.025, help="lam of the active run (default 0.025)")
    parser.add_argument("--out", type=Path, help="write the summary here (JSON)")
    parser.add_argument("--pytest-args", default="", help="more pytest arguments, e.g. \"-k 'not compile'\"")
    args = parser.parse_args(argv)
    if not (args.checkout / "tests").is_dir():
        parser.error(f"--checkout must hold diffusers' tests/ folder, got {str(args.checkout)!r}")
    import shlex

    import diffusers

    extra = shlex.split(args.pytest_args)
    results = {mode: run_mode(mode, args.checkout, args.files, args.lam, extra) for mode in MODES}
    summary = {"diffusers": diffusers.__version__, "lam": args.lam, "files": args.files, **compare(results)}
    for mode in MODES:
        print(f"{mode:8s} {summary['counts'][mode]}")
    for mode in MODES[1:]:
        failing = summary[f"fail_only_{mode}"]
        print(f"fail only {mode}: {len(failing)}" + "".join(f"\n  {t}" for t in failing))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    return 1 if summary["fail_only_swapped"] or summary["fail_only_active"] else 0


if __name__ == "__main__":
    sys.exit(main())
