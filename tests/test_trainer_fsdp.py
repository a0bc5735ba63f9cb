"""FSDP2 in the trainer (``parallel = "fsdp"``) with two gloo processes on CPU (torchrun): the parameters are
sharded, the mFAM is the same on both ranks, the run matches one process accumulating the same global batch,
its sharded checkpoint resumes bit-exactly after a SIGKILL and exports to a plain diffusers folder; and what
FSDP cannot do is refused in one line."""

import socket

import pytest
import torch

from srdiff.trainer import SelfRefiningTrainer, TrainConfig, checkpoint, distributed
from srdiff_testing import (TINY_TRAIN, assert_trained_like_one_process, kill_and_resume, run_losses, run_on_ranks,
                         saved_highlighter)

_WORKER = """
import json, sys, torch
from srdiff.trainer import SelfRefiningTrainer, TrainConfig, distributed, fsdp
trainer = SelfRefiningTrainer(TrainConfig.from_dict(json.loads(sys.argv[1])))
trainer.train()
local = sum(p.to_local().numel() for p in trainer.denoiser.parameters())
weights, ema = fsdp.full_state_dict(trainer.denoiser), trainer.unsharded_ema()
torch.save({"mfam": trainer.mfam, "local_numel": local, "model": weights,
            "ema": ema.state_dict() if ema is not None else None},
           f"{trainer.config.out_dir}/../rank{trainer.dist.rank}.pt")
distributed.shutdown()
"""

# 8 steps: base 4 (checkpoint and base.pt at the switch), a checkpoint at 5, refreshes at 4 and 6; learned
# per-layer projections, so the modulation's own parameters are sharded with their blocks.
RUN = dict(TINY_TRAIN, mode="combined", steps=8, cycle=2, checkpoint_every=5, fam_projection="per_layer",
           parallel="fsdp")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """One uninterrupted 2-rank FSDP run (its config, folder, and per-rank results)."""
    root = tmp_path_factory.mktemp("fsdp")
    config = TrainConfig(**RUN, highlighter=saved_highlighter(root / "hl.pt"), out_dir=str(root / "run"))
    run_on_ranks(_WORKER, config, root)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return config, root, ranks


@pytest.mark.slow
def test_two_fsdp_ranks_shard_and_match_one_process(fsdp_run, tmp_path):
    config, root, (r0, r1) = fsdp_run
    total = sum(v.numel() for k, v in r0["model"].items() if v.is_floating_point())
    assert r0["local_numel"] < 0.6 * total and r1["local_numel"] < 0.6 * total  # each rank holds about half
    assert float(r0["mfam"].max()) > 0 and torch.equal(r0["mfam"], r1["mfam"])

    single = SelfRefiningTrainer(config.replace(parallel="ddp", grad_accum=2, out_dir=str(tmp_path / "single")))
    initial = {name: value.clone() for name, value in single.denoiser.state_dict().items()}
    single.train()
    assert_trained_like_one_process(r0["model"], r0["mfam"], single, initial, config.out_dir, tmp_path / "single")

    # the checkpoint: a small last.pt naming its shards (the step-5 shards it replaced are gone), base.pt too
    out = root / "run" / "checkpoints"
    assert sorted(p.name for p in out.iterdir()) == ["base.pt", "base.shards-000004", "last.pt", "last.shards-000008"]
    state = checkpoint.load(out / "last.pt")
    assert state["sharded"] == str(out / "last.shards-000008") and "model" not in state and state["world_size"] == 2


@pytest.mark.slow
def test_a_sharded_checkpoint_exports_a_plain_pipeline(fsdp_run, tmp_path):
    from diffusers import DDPMPipeline

    from srdiff.cli import main
    from srdiff.trainer.trained import load_trained

    config, root, (r0, _) = fsdp_run
    trained = load_trained(root / "run" / "checkpoints" / "last.pt")  # gathered in this one process
    for name, value in trained.model.state_dict().items():
        assert torch.equal(value, r0["ema"][name]), name
    assert main(["export", "--ckpt", str(root / "run" / "checkpoints" / "last.pt"), "--out", str(tmp_path / "pipe")]) == 0
    unet = DDPMPipeline.from_pretrained(tmp_path / "pipe").unet
    for name, value in unet.state_dict().items():
        assert torch.equal(value, r0["ema"][name]), name


@pytest.mark.slow
def test_fsdp_resume_after_sigkill_is_exact(fsdp_run, tmp_path):
    """Killed after step 6 (its last checkpoint: step 5, mid-refinement) and resumed on two ranks: the same
    losses, weights, EMA, optimiser state, mFAM and highlighter as the uninterrupted run, bit for bit."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    config, root, _ = fsdp_run
    killed = config.replace(out_dir=str(tmp_path / "killed"))
    kill_and_resume(killed, after_step=6, checkpoint_step=5, ranks=2)
    assert run_losses(killed) == run_losses(config)
    a, b = (checkpoint.load(f"{run.out_dir}/checkpoints/last.pt") for run in (config, killed))
    for state, name in ((a, "a.pt"), (b, "b.pt")):
        dcp_to_torch_save(state["sharded"], tmp_path / name)
    shards_a, shards_b = (torch.load(tmp_path / name, weights_only=True) for name in ("a.pt", "b.pt"))
    assert set(shards_a) == {"model", "ema", "optimizer"}
    assert _identical(shards_b, shards_a) > 700  # weights, EMA, AdamW moments: every tensor, bit for bit
    assert float(a["mfam"].max()) > 0
    torch.testing.assert_close(b["mfam"], a["mfam"], rtol=0, atol=0)
    torch.testing.assert_close(b["highlighter"]["state"], a["highlighter"]["state"], rtol=0, atol=0)


def _identical(a, b, where: str = "") -> int:
    """Assert that nested checkpoint contents ``a`` and ``b`` are equal, tensors bit for bit (dict order
    aside: a resumed optimiser lists its state in another order); returns how many tensors it compared."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys differ"
        return sum(_identical(a[k], b[k], f"{where}/{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        return sum(_identical(x, y, f"{where}/{i}") for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
        return 1
    assert a == b, f"{where}: {a!r} != {b!r}"
    return 0


def _one_rank_group(monkeypatch):
    """Make this process the only rank of a gloo group, as ``torchrun --nproc_per_node=1`` would."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)


@pytest.mark.slow
def test_what_fsdp_cannot_do_is_refused(fsdp_run, tmp_path, monkeypatch):
    from srdiff.trainer.backbones.base import get_backbone

    config, root, _ = fsdp_run
    last = root / "run" / "checkpoints" / "last.pt"
    with pytest.raises(ValueError, match="parallel 'fsdp' shards the denoiser over the ranks of a torchrun launch"):
        SelfRefiningTrainer(config.replace(out_dir=str(tmp_path / "alone")))
    with pytest.raises(ValueError, match=r"Sequential \(backbone 'unet'\) has none of the blocks \['down_blocks', "
                                         r"'mid_block', 'up_blocks'\]: use parallel 'ddp'"):
        get_backbone("unet").shard_units(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1)))
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "last.pt").write_bytes(last.read_bytes())  # without its shards
    with pytest.raises(ValueError, match=r"names its shards .*last.shards-000008', which hold no complete sharded "
                                         r"checkpoint \(no DCP .metadata\): they were moved or deleted"):
        checkpoint.load(tmp_path / "moved" / "last.pt")
    ddp = SelfRefiningTrainer(config.replace(parallel="ddp", out_dir=str(tmp_path / "ddp")))
    with pytest.raises(ValueError, match="cannot resume from .*: the config differs in parallel: 'fsdp' -> 'ddp'"):
        ddp.resume(str(last))

    _one_rank_group(monkeypatch)
    try:
        one = SelfRefiningTrainer(config.replace(out_dir=str(tmp_path / "one")))
        assert one.dist.world_size == 1 and one.sharded
        with pytest.raises(ValueError, match=r"its shards \(parallel 'fsdp'\) were written by 2 ranks and this run "
                                             r"has 1; run it on 2 \(torchrun --nproc_per_node=2\)"):
            one.resume(str(last))
    finally:
        distributed.shutdown()
