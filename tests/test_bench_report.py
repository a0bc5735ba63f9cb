"""benchmarks/srdiff_bench/report.py: the README's performance section comes from stored JSON, ratios and % of peak
are computed from it, unavailable providers get their reason, and GPU tables sit beside CPU ones.
The GPU run's plumbing: its JSON-lines results survive a kill and store per chunk, and its plan fits."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from srdiff_bench import report, store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _case(op, provider, ms, *, shape=None, mode="fwd", dtype="float32", **extra):
    info = {"op": op, "provider": provider, "mode": mode, "shape": shape or {"N": 1024}, "dtype": dtype,
            "median_ms": ms, **extra}
    return {"extra_info": info}


def _run(label, device, stamp, benchmarks, unavailable=(), quick=False):
    return {"machine_info": {"label": label, "device": device, "torch": "2.x", "quick": quick},
            "commit_info": {"id": "0123456789abcdef"}, "datetime": stamp, "benchmarks": benchmarks,
            "unavailable": list(unavailable)}


def _write(tmp_path, label, name, run):
    folder = tmp_path / "results" / label
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(run))


def _render(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "ROOT", str(tmp_path))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.BEGIN}\nold\n{report.END}\n\ntail\n")
    assert report.main(["--results", str(tmp_path / "results"), "--readme", str(readme),
                        "--figures", str(tmp_path / "figures")]) == 0
    return readme.read_text()


def test_tables_ratios_peak_and_reasons(tmp_path, monkeypatch):
    cpu = _run("cpu-2core", "CPU: Xeon", "2026-11-28T00:00:00", [
        _case("ceilings", "copy", 1.0, gbps=20.0),
        _case("noise", "srdiff", 2.0, gbps=10.0),
        _case("noise", "diffusers", 3.0, gbps=6.7),
    ], unavailable=[{"op": "noise", "provider": "reference", "mode": "fwd", "shape": {"N": 1024},
                     "dtype": "float32", "reason": "runs on CUDA only"}])
    _write(tmp_path, "cpu-2core", "old.json", {**cpu, "datetime": "2026-11-27T00:00:00",
                                                 "benchmarks": [_case("noise", "srdiff", 99.0)]})
    _write(tmp_path, "cpu-2core", "new.json", cpu)
    text = _render(tmp_path, monkeypatch)
    assert text.startswith("# x\n\n") and text.endswith("\n\ntail\n") and "old\n" not in text
    row = next(line for line in text.splitlines() if line.startswith("| N=1024 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # srdiff first, then peers by name; ratio = peer / srdiff; % of peak = 10 / 20 GB/s
    assert cells[:6] == ["N=1024", "float32", "fwd", "2", "3", "n/a [1]"], cells
    assert "1.50x" in cells and "50%" in cells, cells
    assert "[1] runs on CUDA only" in text
    assert "No GPU results are stored yet" in text
    assert "99" not in row  # the newest run wins


def test_gpu_table_stands_before_the_cpu_one(tmp_path, monkeypatch):
    for label, device in (("cpu-2core", "CPU: Xeon"), ("h100", "NVIDIA H100")):
        _write(tmp_path, label, "r.json", _run(label, device, "2026-11-28T00:00:00",
                                               [_case("gradcam", "srdiff", 1.0), _case("gradcam", "peer", 4.0)]))
    text = _render(tmp_path, monkeypatch)
    assert "No GPU results" not in text
    assert text.index("#### gradcam on NVIDIA H100") < text.index("#### gradcam on CPU: Xeon")
    assert text.count("4.00x") == 2


def test_missing_markers_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        report.main(["--results", str(tmp_path / "results"), "--readme", str(readme)])


def _session(chunk, label="h200", stamp="2026-12-01T09:00:00+00:00"):
    return {"type": "session", "chunk": chunk, "commit": "abcdef12", "datetime": stamp,
            "machine_info": {"label": label, "device": "NVIDIA H200", "torch": "2.11.0", "quick": False}}


def _jsonl_case(chunk, op, provider, ms):
    return {"type": "case", "chunk": chunk, "name": f"test_{op}[{provider}]", "stats": {"median": ms / 1e3},
            "extra_info": _case(op, provider, ms)["extra_info"]}


def _jsonl_lines(cut_last=True):
    lines = [json.dumps(r) for r in (
        _session("noise"), _jsonl_case("noise", "noise", "srdiff", 1.0),
        {"type": "unavailable", "chunk": "noise", "op": "noise", "provider": "diffusers", "mode": "fwd",
         "shape": {"N": 1024}, "dtype": "float32", "reason": "diffusers is not installed"},
        _session("gradcam"), _jsonl_case("gradcam", "gradcam", "srdiff", 2.0),
        _jsonl_case("gradcam", "gradcam", "reference", 6.0))]
    return "\n".join(lines) + ('\n{"type": "case", "chu' if cut_last else "\n")


def test_jsonl_run_reads_what_a_killed_run_left(tmp_path, monkeypatch):
    folder = tmp_path / "results" / "h200"
    folder.mkdir(parents=True)
    (folder / "run.jsonl").write_text(_jsonl_lines(cut_last=True))
    run = report.read_jsonl_run(str(folder / "run.jsonl"))
    assert run["commit_info"] == {"id": "abcdef12"} and run["machine_info"]["label"] == "h200"
    assert [b["extra_info"]["provider"] for b in run["benchmarks"]] == ["srdiff", "srdiff", "reference"]
    assert run["unavailable"] == [{"op": "noise", "provider": "diffusers", "mode": "fwd", "shape": {"N": 1024},
                                   "dtype": "float32", "reason": "diffusers is not installed"}]
    text = _render(tmp_path, monkeypatch)
    assert "#### gradcam on NVIDIA H200" in text and "3.00x" in text and "diffusers is not installed" in text
    (folder / "bad.jsonl").write_text('{"type": "session"\n' + _jsonl_lines(cut_last=False))
    with pytest.raises(ValueError, match="bad.jsonl:1 is not a JSON line"):
        report.read_jsonl_run(str(folder / "bad.jsonl"))


def test_store_writes_one_file_per_chunk_and_never_replaces(tmp_path):
    files_at = tmp_path / "files"
    files_at.mkdir()
    (files_at / "20261201T090000Z_abcdef12_call1_bench.jsonl").write_text(_jsonl_lines(cut_last=True))
    (files_at / "20261201T090000Z_abcdef12_call1_tests.jsonl").write_text('{"nodeid": "t", "outcome": "passed"}\n')
    results = tmp_path / "results"
    stored = store.store(str(files_at), str(results))
    names = sorted(os.path.relpath(p, results) for p in stored)
    assert names == ["h200/20261201T090000Z_abcdef12_gradcam.jsonl", "h200/20261201T090000Z_abcdef12_noise.jsonl",
                     "h200/tests/20261201T090000Z_abcdef12_call1_tests.jsonl"]
    noise = report.read_jsonl_run(str(results / names[1]))
    assert len(noise["benchmarks"]) == 1 and len(noise["unavailable"]) == 1
    assert len(report.read_jsonl_run(str(results / names[0]))["benchmarks"]) == 2
    (run,) = report.load_runs(str(results))  # the chunks of one call read back as one run
    assert len(run["benchmarks"]) == 3 and len(run["unavailable"]) == 1
    with pytest.raises(SystemExit, match="refusing to replace"):
        store.store(str(files_at), str(results))


def test_live_log_keeps_finished_results_through_a_kill(tmp_path):
    """The test step's record: each result is on disk as it finishes, so SIGKILL loses only the running test."""
    (tmp_path / "test_victim.py").write_text(
        "import time, pytest\n"
        "def test_passes(): pass\n"
        "def test_fails(): assert 1 == 2, 'planted failure'\n"
        "def test_skips(): pytest.skip('planted skip')\n"
        "def test_hangs(): time.sleep(120)\n")
    log = tmp_path / "live.jsonl"
    env = {**os.environ, "SRDIFF_LIVE_JSONL": str(log), "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "benchmarks")])}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "srdiff_bench.live_log", "-p", "no:cacheprovider",
                             "-q", "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path / "test_victim.py")],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    outcomes = {r["nodeid"].split("::")[-1]: r for r in records}
    assert {k: r["outcome"] for k, r in outcomes.items()} == {
        "test_passes": "passed", "test_fails": "failed", "test_skips": "skipped"}, records
    assert "planted failure" in outcomes["test_fails"]["text"] and "planted skip" in outcomes["test_skips"]["text"]


@pytest.mark.parametrize("call", ["1", "2"])
def test_gpu_plan_fits_its_deadline(call):
    """gpu.sh's step caps add up to less than the call's deadline, which is under the device call's limit."""
    out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), "--plan", "--call", call],
                         capture_output=True, text=True, check=True).stdout
    deadline = int(re.search(r"deadline (\d+)s", out).group(1))
    caps = [int(m) for m in re.findall(r"^ +\S+ +(\d+)s", out, re.M)]
    assert sum(caps) == int(re.search(r"caps total (\d+)s", out).group(1)) <= deadline <= 540
    for step in ("tests", "ceilings", "attention_fwd", "attention_fwdbwd", "flex") if call == "1" else ("train",):
        assert re.search(rf"^ +{step} +\d+s", out, re.M), step


def test_percent_of_peak_uses_ceilings_of_the_same_device_only():
    """A machine label (cpu-2core) covers several CPU models: an op measured on one is never put
    against the copy bandwidth measured on another."""
    ceil = _case("ceilings", "copy", 1.0, gbps=20.0)
    op = _case("noise", "srdiff", 1.0)
    xeon = _run("cpu-2core", "CPU: Xeon", "2026-11-28T00:00:00", [ceil])
    amd_op_only = _run("cpu-2core", "CPU: EPYC", "2026-12-01T00:00:00", [op])
    amd_with_ceilings = _run("cpu-2core", "CPU: EPYC", "2026-12-01T00:00:00", [op, ceil])
    assert report._ceilings_run(amd_op_only, xeon) is None
    assert report._ceilings_run(amd_with_ceilings, xeon) is amd_with_ceilings
    assert report._ceilings_run(_run("cpu-2core", "CPU: Xeon", "2026-11-29T00:00:00", [op]), xeon) is xeon


def _static_row(kernel, modulated, total, *, regs=128, stl=0, ctas=2):
    return {"kernel": kernel, "D": 64, "modulated": modulated,
            "config": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "maxnreg": 128},
            "registers": regs, "spill_stores": stl, "ctas": ctas,
            "main_loop": {"total": total, "classes": {"mufu": 34, "half": 16 if modulated else 0},
                          "mma_shapes": {"HGMMA.64x64x16": 8}}}


def test_static_table_is_rendered_from_the_stored_checks(tmp_path, monkeypatch):
    """docs/attention.md's static sm_90 table comes from benchmarks/results/sm90-static/ (newest record,
    and the oldest's ratios beside it), which the performance section does not read as runs."""
    static = tmp_path / "results" / report.STATIC_DIR
    static.mkdir(parents=True)
    for stamp, commit, fam_total in (("2026-12-01T00:00:00", "aaaa1111", 400),
                                     ("2026-12-02T00:00:00", "bbbb2222", 330)):
        record = {"datetime": stamp, "commit": commit, "target": "sm_90a", "triton": "3.8.0", "dtype": "bf16",
                  "rows": [_static_row("fwd", False, 300), _static_row("fwd", True, fam_total)]}
        (static / f"{stamp[:10]}_{commit}.json").write_text(json.dumps(record))
    doc = tmp_path / "attention.md"
    doc.write_text(f"intro\n{report.STATIC_BEGIN}\nold\n{report.STATIC_END}\nrest\n")
    text = _render(tmp_path, monkeypatch)
    assert "No GPU results" in text  # the static records are not benchmark runs
    assert report.main(["--results", str(tmp_path / "results"), "--readme", str(tmp_path / "README.md"),
                        "--figures", str(tmp_path / "figures"), "--attention-doc", str(doc)]) == 0
    page = doc.read_text()
    assert page.startswith("intro\n") and page.endswith("rest\n") and "old\n" not in page
    row = next(line for line in page.splitlines() if line.startswith("| fwd "))
    assert "300 / 330" in row and "1.10x" in row and "0 / 16" in row and "128x64 w8 s2 r128" in row, row
    assert "commit aaaa1111" in page and "fwd D=64 128x64 w8 s2 r128: 1.33x" in page


def test_dispatch_table_from_the_stored_gpu_rows(tmp_path):
    """srdiff_bench.dispatch_table pairs the two forced paths per case (both must have run), names the
    faster with both times and peak memories, and keeps the table's default."""
    from srdiff_bench import dispatch_table

    def case(provider, ms, D=128, N=4096, mode="fwd"):
        return _case("fam_attention", provider, ms, shape={"B": 4, "H": 16, "N": N, "D": D}, mode=mode,
                     dtype="bfloat16", peak_memory_mb=ms * 10)

    run = _run("h200", "NVIDIA H200", "2026-12-05T00:00:00", [
        case("srdiff-fused", 2.0), case("srdiff-sdpa", 1.5), case("sdpa-flash", 1.0),
        case("srdiff-fused", 5.0, mode="fwd+bwd"), case("srdiff-sdpa", 6.0, mode="fwd+bwd"),
        case("srdiff-fused", 1.0, D=64)])  # D = 64: one path only, no entry
    run["machine_info"]["capability"] = "9.0"
    _write(tmp_path, "h200", "r.json", run)
    table = tmp_path / "table.json"
    default = {"fwd": "sdpa", "fwd+bwd": "sdpa", "basis": "estimate"}
    table.write_text(json.dumps({"default": default, "measured": []}))
    assert dispatch_table.main(["--results", str(tmp_path / "results"), "--out", str(table)]) == 0
    written = json.loads(table.read_text())
    assert written["default"] == default
    by_mode = {e["mode"]: e for e in written["measured"]}
    assert set(by_mode) == {"fwd", "fwd+bwd"} and len(written["measured"]) == 2
    assert by_mode["fwd"]["faster"] == "sdpa" and by_mode["fwd+bwd"]["faster"] == "triton"
    assert by_mode["fwd"]["triton_ms"] == 2.0 and by_mode["fwd"]["sdpa_peak_mb"] == 15.0
    assert (by_mode["fwd"]["capability"], by_mode["fwd"]["D"], by_mode["fwd"]["N"]) == ("9.0", 128, 4096)
