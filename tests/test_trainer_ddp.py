"""DDP with two gloo processes on CPU (torchrun): it runs, the mFAM is the same on both ranks, and the run
matches one process accumulating the same global batch in two micro-batches."""

import pytest
import torch

from srdiff.trainer import SelfRefiningTrainer, TrainConfig
from srdiff_testing import TINY_TRAIN, assert_trained_like_one_process, run_on_ranks, saved_highlighter

_WORKER = """
import json, sys, torch
from srdiff.trainer import SelfRefiningTrainer, TrainConfig, distributed
trainer = SelfRefiningTrainer(TrainConfig.from_dict(json.loads(sys.argv[1])))
trainer.train()
torch.save({"mfam": trainer.mfam, "model": trainer.denoiser.state_dict(), "world_size": trainer.dist.world_size},
           f"{trainer.config.out_dir}/rank{trainer.dist.rank}.pt")
distributed.shutdown()
"""

# 6 steps, 3 refreshes; a saved highlighter (tests/srdiff_testing.py): its maps are not blank, so "identical on
# both ranks" means something; with one, the highlighter is also fine-tuned at every refresh (rank 0, then
# broadcast).
RUN = dict(TINY_TRAIN, mode="combined", steps=6, cycle=2, checkpoint_every=100)


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    base = dict(RUN, highlighter=saved_highlighter(tmp_path / "hl.pt"))
    run_on_ranks(_WORKER, TrainConfig(**base, out_dir=str(tmp_path / "ddp")), tmp_path)
    r0, r1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert float(r0["mfam"].max()) > 0  # a real map, not a trivially equal blank
    assert torch.equal(r0["mfam"], r1["mfam"])  # all-reduced: identical, not just close
    for name in r0["model"]:
        assert torch.equal(r0["model"][name], r1["model"][name]), name

    single = SelfRefiningTrainer(TrainConfig(**{**base, "grad_accum": 2}, out_dir=str(tmp_path / "single")))
    initial = {name: value.clone() for name, value in single.denoiser.state_dict().items()}
    single.train()
    assert_trained_like_one_process(r0["model"], r0["mfam"], single, initial, tmp_path / "ddp", tmp_path / "single")
