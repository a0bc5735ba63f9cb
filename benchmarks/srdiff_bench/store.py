"""Store what a gpu.sh call brought back: each benchmark chunk as its own JSON-lines file under
benchmarks/results/<machine>/, the test results under benchmarks/results/<machine>/tests/.

    PYTHONPATH=benchmarks python -m srdiff_bench.store <files_at> [--results benchmarks/results]

Files are named <stamp>_<commit>_<chunk>.jsonl (stamp and commit from the name gpu.sh gave them).
An existing file is never replaced: storing the same call twice is refused.
"""

import argparse
import glob
import json
import os
from collections import defaultdict

from srdiff_bench.report import RESULTS

SUFFIX_BENCH, SUFFIX_TESTS = "_bench.jsonl", "_tests.jsonl"


def split_chunks(path: str) -> dict[str, list[str]]:
    """chunk name -> its lines (session, cases, unavailable) of one ``*_bench.jsonl``."""
    chunks: dict[str, list[str]] = defaultdict(list)
    with open(path) as f:
        for line in f:
            try:
                chunk = json.loads(line).get("chunk") or "unnamed"
            except json.JSONDecodeError:  # a last line cut off by a kill
                continue
            chunks[chunk].append(line if line.endswith("\n") else line + "\n")
    return dict(chunks)


def _label(lines: list[str]) -> str:
    for line in lines:
        record = json.loads(line)
        if record.get("type") == "session":
            return record["machine_info"]["label"]
    raise ValueError("no session line: cannot tell the machine")


def _write_new(path: str, text: str) -> None:
    if os.path.exists(path):
        raise SystemExit(f"{path} exists: refusing to replace it (stored already?)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(f"stored {path}")


def write_json(path: str, record) -> None:
    """``record`` as indented JSON with a final newline (the stored tables and records)."""
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def store(files_at: str, results: str) -> list[str]:
    stored = []
    for bench in sorted(glob.glob(os.path.join(files_at, "*" + SUFFIX_BENCH))):
        stamp_commit = os.path.basename(bench)[: -len(SUFFIX_BENCH)].rsplit("_", 1)[0]  # drop _callN
        chunks = split_chunks(bench)
        for chunk, lines in chunks.items():
            path = os.path.join(results, _label(lines), f"{stamp_commit}_{chunk}.jsonl")
            _write_new(path, "".join(lines))
            stored.append(path)
        label = _label(next(iter(chunks.values()))) if chunks else None
        tests = bench[: -len(SUFFIX_BENCH)] + SUFFIX_TESTS
        if label and os.path.exists(tests):
            path = os.path.join(results, label, "tests", os.path.basename(tests))
            with open(tests) as f:
                _write_new(path, f.read())
            stored.append(path)
    if not stored:
        raise SystemExit(f"no *{SUFFIX_BENCH} in {files_at}")
    return stored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files_at", help="the folder the device call's files were copied to")
    parser.add_argument("--results", default=RESULTS)
    args = parser.parse_args(argv)
    store(args.files_at, args.results)
    print("next: PYTHONPATH=benchmarks python -m srdiff_bench.report")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
