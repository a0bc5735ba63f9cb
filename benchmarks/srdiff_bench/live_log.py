"""A pytest plugin that writes one JSON line per test result the moment it is known, so a test run
killed by its timeout still says which tests passed, failed or were skipped, and why.

    SRDIFF_LIVE_JSONL=results.jsonl python -m pytest -p srdiff_bench.live_log tests ...

Each line: nodeid, phase (setup/call/teardown), outcome, duration in seconds, and for failures and
skips the report text (cut to 4,000 characters). Only phases that say something are written: every
call, and a setup or teardown that failed or skipped. Under pytest-xdist the reports reach the
controller, which writes them: one file, one writer.
"""

import json
import os
import time

PATH_VARIABLE = "SRDIFF_LIVE_JSONL"
MAX_TEXT = 4000
_STATE = {"worker": False}


def pytest_configure(config):
    _STATE["worker"] = hasattr(config, "workerinput")  # an xdist worker: its controller writes


def _write(record: dict) -> None:
    path = os.environ.get(PATH_VARIABLE)
    if not path or _STATE["worker"]:
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def pytest_runtest_logreport(report):
    if report.when != "call" and report.passed:
        return
    record = {"nodeid": report.nodeid, "phase": report.when, "outcome": report.outcome,
              "duration_s": round(report.duration, 3), "time": time.time()}
    gateway = getattr(getattr(report, "node", None), "gateway", None)  # pytest-xdist's worker
    if gateway is not None:
        record["worker"] = gateway.id
    if not report.passed:
        record["text"] = str(report.longreprtext)[-MAX_TEXT:]
    _write(record)


def pytest_sessionfinish(session, exitstatus):
    _write({"nodeid": None, "phase": "session", "outcome": "finished", "exitstatus": int(exitstatus),
            "time": time.time()})
