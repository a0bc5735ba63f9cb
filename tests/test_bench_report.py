"""benchmarks/report.py: the README's performance section comes from stored JSON, ratios and % of peak
are computed from it, unavailable providers get their reason, and GPU tables sit beside CPU ones."""

import json

import pytest

from benchmarks import report


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
