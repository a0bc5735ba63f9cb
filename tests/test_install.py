"""What a new user meets before any op runs: import names that never shadow an installed distribution,
and a wheel (built from the sdist) that installs into a fresh venv and works outside the repository.
"""

import importlib.util
import os
import subprocess
import sys
import tarfile
import textwrap
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(args, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_third_party_imports_from_the_repo_root_get_their_own_packages():
    """From the repo root (where `python -m srdiff` and `make demo` run, cwd first on sys.path),
    diffusers, peft and transformers import as they do anywhere else, and `import kernels` is Hugging
    Face's distribution (which transformers 5 imports), never a folder of this repository."""
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("Hugging Face's kernels distribution is not installed (the lock installs it)")
    code = textwrap.dedent("""
        import importlib.metadata, os
        from diffusers import UNet2DModel
        from transformers import CLIPTextConfig, CLIPTextModel
        import peft
        import kernels
        UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
        CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, vocab_size=64))
        files = importlib.metadata.distribution("kernels").files
        ours = {os.path.realpath(f.locate()) for f in files if f.name == "__init__.py"}
        assert os.path.realpath(kernels.__file__) in ours, kernels.__file__
        print("kernels from", kernels.__file__)
    """)
    _run([sys.executable, "-c", code], cwd=REPO)


# Every name this checkout can put ahead of site-packages, by the folder that lands on sys.path: the root
# (`python -m srdiff` and `make demo` run there), tests/ (pytest's rootdir-less imports), benchmarks/
# (`make bench` and pytest: PYTHONPATH=benchmarks) and examples/ (`python examples/<script>.py`). Only
# regular packages and modules count: a folder without __init__.py (configs/, docs/, csrc/) is at most a
# namespace package, which any installed distribution of that name outranks. Each name below was checked
# against the package index (no distribution of that name, 2026-12-07); a new one must be checked the same
# way before it is added. pytest's own test_*.py / conftest.py conventions are not listed.
IMPORT_NAMES = {
    ".": {"srdiff", "setup"},
    "tests": {"srdiff_testing", "fam_reference", "tiny_models"},
    "benchmarks": {"srdiff_bench"},
    "examples": {"train_unconditional", "train_text_to_image_lora"},
}


def _importable_names(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    modules = {p.stem for p in folder.glob("*.py") if not p.stem.startswith("test_") and p.stem != "conftest"}
    packages = {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
    return modules | packages


def test_every_importable_name_of_the_repo_was_checked_against_the_package_index():
    """A module or package added where it can be imported by its bare name (e.g. a top-level `kernels/`
    package, a `tests/utils.py`) fails here until its name is checked against the package index and listed:
    such a folder once took `import kernels` away from transformers (issue 21)."""
    found = {folder: _importable_names(REPO / folder) for folder in IMPORT_NAMES}
    unchecked = {folder: sorted(names - IMPORT_NAMES[folder]) for folder, names in found.items()
                 if names - IMPORT_NAMES[folder]}
    assert not unchecked, (f"importable by their bare names but not in IMPORT_NAMES: {unchecked}; check each "
                           "against the package index (a distribution of that name could be shadowed), then list it")
    gone = {folder: sorted(IMPORT_NAMES[folder] - names) for folder, names in found.items()
            if IMPORT_NAMES[folder] - names}
    assert not gone, f"listed in IMPORT_NAMES but no longer in the repository: {gone}"


def test_no_importable_name_of_the_repo_is_an_installed_distribution():
    """What the check above can test on any machine: none of those names is the top-level import of a
    distribution installed here (srdiff itself and setuptools' `setup` convention aside)."""
    import importlib.metadata

    installed = importlib.metadata.packages_distributions()
    ours = set().union(*IMPORT_NAMES.values()) - {"srdiff", "setup"}
    clashes = {name: installed[name] for name in ours if name in installed}
    assert not clashes, f"these import names of the repository shadow installed distributions: {clashes}"


def _tracked_tree(dest: Path) -> Path:
    """The files git tracks, as they are in the working tree (what an sdist of this checkout holds)."""
    files = _run(["git", "ls-files", "-z"], cwd=REPO).stdout.split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
    return dest


def _fresh_venv(path: Path) -> Path:
    """A new venv with an empty site-packages of its own; srdiff's dependencies (torch, diffusers, ...), pip
    and setuptools come from this interpreter's site-packages through a .pth line (the .pth files there,
    the editable srdiff's among them, are not processed), and pip installs into the new venv."""
    venv.EnvBuilder(with_pip=False, clear=True).create(path)
    python = path / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir()]
    Path(site, "srdiff_test_deps.pth").write_text("\n".join(deps) + "\n")
    return python


SMOKE = textwrap.dedent("""
    import os, sys, torch
    import srdiff, srdiff.kernels.fam_attention
    from srdiff import _extension
    site = sys.argv[1]
    assert srdiff.__file__.startswith(site), srdiff.__file__
    assert srdiff.kernels.fam_attention.__file__.startswith(site)
    assert _extension.HAS_EXT, _extension.WHY_NOT

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 21, 16, generator=g) for _ in range(3))
    fam = torch.rand(21, generator=g)
    ref = srdiff.fam_attention(q, k, v, fam, 0.025, backend="reference")
    tri = srdiff.fam_attention(q, k, v, fam, 0.025, backend="triton")   # TRITON_INTERPRET=1
    torch.testing.assert_close(tri, ref, atol=1e-5, rtol=1e-5)

    acts, grads = torch.randn(2, 5, 4, 4, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    torch.testing.assert_close(srdiff.gradcam_reduce(acts, grads, size=(8, 8), backend="extension"),
                               srdiff.gradcam_reduce(acts, grads, size=(8, 8), backend="reference"),
                               atol=1e-5, rtol=1e-5)
    x0, t = torch.rand(2, 1, 8, 8, generator=g), torch.tensor([3, 700])
    alphas = torch.linspace(0.999, 0.01, 1000)
    x_t, _ = srdiff.amplified_add_noise(x0, t, alphas, fam=torch.rand(8, 8, generator=g), lam=0.01, seed=5,
                                        backend="extension")
    assert torch.isfinite(x_t).all()

    from diffusers import UNet2DModel
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                       norm_num_groups=4, attention_head_dim=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    srdiff.set_fam_attn_processor(unet, lam=0.5)
    x = torch.randn(2, 1, 8, 8, generator=g)
    plain = unet(x, t).sample
    with srdiff.fam_context(torch.rand(8, 8, generator=g)):
        modulated = unet(x, t).sample
    assert not torch.equal(plain, modulated)
    print("smoke ok")
""")


@pytest.mark.slow
def test_sdist_then_wheel_installs_into_a_fresh_venv_and_runs_outside_the_repo(tmp_path):
    """`pip install` of the sdist (not editable) into a fresh venv builds srdiff._C (CPU kernels here:
    FORCE_CUDA=0) and installs the Triton kernels; then, from a folder outside the repo, the attention
    op's reference and Triton-interpreter paths agree, the _C ops run, a FAM processor modulates a tiny
    UNet2DModel, and the `srdiff` command answers --help."""
    from setuptools import build_meta

    src = _tracked_tree(tmp_path / "src")
    cwd = os.getcwd()
    try:
        os.chdir(src)
        sdist = src / "dist" / build_meta.build_sdist(str(src / "dist"))
    finally:
        os.chdir(cwd)
    with tarfile.open(sdist) as tar:
        members = {Path(*Path(m).parts[1:]).as_posix() for m in tar.getnames()}
    for path in ("csrc/ops.cpp", "csrc/gradcam.h", "csrc/cpu/noise_cpu.cpp", "csrc/cpu/normal_stream.h",
                 "srdiff/_sources.py", "srdiff/kernels/fam_attention.py", "setup.py", "LICENSE"):
        assert path in members, f"the sdist lacks {path}"
    assert any(m.startswith("csrc/cuda/") and m.endswith(".cu") for m in members), "the sdist lacks the CUDA sources"

    python = _fresh_venv(tmp_path / "venv")
    env = {**os.environ, "FORCE_CUDA": "0", "MAX_JOBS": "2", "PIP_NO_INPUT": "1"}
    env.pop("PYTHONPATH", None)
    _run([str(python), "-m", "pip", "install", "-q", "--no-index", "--no-build-isolation", "--no-deps", str(sdist)],
         env=env, cwd=tmp_path)
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    smoke = _run([str(python), "-c", SMOKE, site], env={**env, "TRITON_INTERPRET": "1"}, cwd=outside)
    assert "smoke ok" in smoke.stdout
    helped = _run([str(tmp_path / "venv" / "bin" / "srdiff"), "--help"], env=env, cwd=outside)
    assert "srdiff" in helped.stdout
