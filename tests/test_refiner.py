"""srdiff.Refiner, the refinement cycle as a component: the schedule, the highlighter's start and fine-tunes,
the map and its checks, checkpoints, bad input. Ranks: tests/test_examples.py (accelerate) and
tests/test_trainer_ddp.py (torchrun)."""

import pytest
import torch

from srdiff.diffusion.seeding import image_generators
from srdiff.highlighter import FlawHighlighter
from srdiff.refiner import EMPTY_MAP_STD, EmptyMapError, HighlighterRecipe, Refiner

SIZE = 8


def real_images(n=16):
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


class Sampler:
    """Images keyed by (seed, image index), as the contract asks; counts its calls."""

    def __init__(self, weights=False):
        self.calls, self.weights = [], weights

    def __call__(self, n, seed, first_index):
        self.calls.append((n, seed, first_index))
        images = torch.stack([torch.randn(1, SIZE, SIZE, generator=g).sigmoid()
                              for g in image_generators(seed, first_index, n)])
        if self.weights:
            return images, (images[:, 0] > 0.5).float()
        return images


def refiner(highlighter=None, sampler=None, **changes):
    kwargs = dict(base_steps=3, cycle=2, mfam_samples=4, finetune_steps=1, seed=0)
    return Refiner(highlighter or HighlighterRecipe(epochs=1, samples=8), real_images(), sampler or Sampler(),
                   **{**kwargs, **changes})


def blank_highlighter():
    """A highlighter whose scores are all zero: every FAM is empty."""
    hl = FlawHighlighter(backbone="small", in_channels=1, image_size=SIZE)
    with torch.no_grad():
        for p in hl.net.head.parameters():
            p.zero_()
    return hl


def test_the_map_is_none_in_the_base_phase_and_refreshed_every_cycle():
    sampler = Sampler()
    r = refiner(sampler=sampler)
    maps = [r.step(s) for s in range(3)]
    assert maps == [None] * 3 and not sampler.calls
    maps += [r.step(s) for s in range(3, 8)]
    assert r.last_record["step"] == 7 and r.last_record["cycle"] == 2
    # the recipe's 8 samples, then 4 per refresh at steps 3, 5, 7 (all rank 0's share: first_index 0)
    assert [n for n, _, _ in sampler.calls] == [8, 4, 4, 4] and {f for _, _, f in sampler.calls} == {0}
    assert len({seed for _, seed, _ in sampler.calls}) == 4  # every draw keyed apart
    assert maps[3] is not maps[5] and maps[4] is maps[3] and maps[7] is r.mfam
    assert r.step(7) is maps[7] and len(sampler.calls) == 4  # a step's second call (a micro-batch) reuses its map
    assert maps[7].shape == (SIZE, SIZE) and 0 <= float(maps[7].min()) and float(maps[7].max()) <= 1


def test_records_say_how_the_highlighter_started_and_how_it_sees_the_samples():
    r = refiner()
    first = r.refresh(3)
    assert first["highlighter"] == "trained" and first["epochs"] == 1
    assert "finetune_accuracy" not in first  # just trained on fresh samples
    second = r.refresh(5)
    assert "highlighter" not in second and 0 <= second["finetune_accuracy"] <= 1
    for record in (first, second):
        assert 0 <= record["highlighter_balanced_accuracy"] <= 1
        assert record["mfam_max"] >= record["mfam_mean"] >= 0 and record["mfam_std"] >= 0
        assert 0 <= record["empty_fam_fraction"] <= 1 and "warning" not in record

    given = refiner(highlighter=FlawHighlighter(backbone="small", in_channels=1, image_size=SIZE))
    record = given.refresh(3)
    assert record["highlighter"] == "given" and "finetune_accuracy" in record  # fine-tuned from the first refresh


def test_a_loaded_highlighter_is_named_in_the_record(tmp_path):
    FlawHighlighter(backbone="small", in_channels=1, image_size=SIZE).save(tmp_path / "hl.pt")
    record = refiner(highlighter=str(tmp_path / "hl.pt")).refresh(3)
    assert record["highlighter"] == "loaded" and record["path"] == str(tmp_path / "hl.pt")


def test_state_dict_resumes_the_cycle_exactly():
    whole = refiner()
    maps = [whole.step(s) for s in range(8)]

    first = refiner()
    for s in range(6):
        first.step(s)
    state = first.state_dict()
    assert set(state) == {"mfam", "highlighter"} and state["mfam"].device.type == "cpu"
    resumed = refiner()
    resumed.load_state_dict(state)
    assert not resumed.due(6) and resumed.due(7)
    assert torch.equal(resumed.step(6), maps[6]) and torch.equal(resumed.step(7), maps[7])
    for name, value in whole.highlighter.state_dict().items():
        assert torch.equal(resumed.highlighter.state_dict()[name], value), name


def test_metrics_are_the_numbers_of_the_refresh_before_that_step_only():
    r = refiner()
    assert r.metrics(3) == {}
    record = r.refresh(3)
    metrics = r.metrics(3)
    assert metrics["refresh/cycle"] == 0 and metrics["refresh/mfam_max"] == record["mfam_max"]
    assert "refresh/event" not in metrics and r.metrics(4) == {}


def test_a_refinement_step_without_a_map_refreshes_at_once():
    r = refiner()
    assert r.due(6) and r.step(6) is not None and r.last_record["cycle"] == 1
    assert r.due(7) and not r.due(8)  # the cycle keeps its steps


def test_weights_give_the_weighted_mean_per_pixel():
    sampler = Sampler(weights=True)
    r = refiner(sampler=sampler, finetune_steps=0)
    r.refresh(3)
    images, weights = sampler(4, *sampler.calls[-1][1:])
    fams = r.highlighter.fam(images)
    mass = weights.sum(0)
    expected = torch.where(mass > 0, (fams * weights).sum(0) / mass.clamp_min(1e-12), torch.zeros_like(mass))
    torch.testing.assert_close(r.mfam, expected, rtol=0, atol=0)


def test_an_empty_map_warns_naming_the_refresh_and_the_highlighters_accuracy():
    r = refiner(highlighter=blank_highlighter(), finetune_steps=0)
    with pytest.warns(UserWarning, match=r"refresh 0 \(before step 3\): the mFAM is empty .* balanced accuracy"):
        mfam = r.step(3)
    assert float(mfam.max()) == 0 and "is empty" in r.last_record["warning"]
    assert r.last_record["empty_fam_fraction"] == 1.0


def test_require_fam_stops_at_an_empty_or_constant_map(monkeypatch):
    r = refiner(highlighter=blank_highlighter(), finetune_steps=0, require_fam=True)
    with pytest.raises(EmptyMapError, match="refresh 0 .* the mFAM is empty") as caught:
        r.refresh(3)
    assert caught.value.record["mfam_max"] == 0 and "warning" in caught.value.record

    flat = refiner(require_fam=True)
    monkeypatch.setattr(FlawHighlighter, "fam", lambda self, x: torch.full((len(x), SIZE, SIZE), 0.5))
    with pytest.raises(EmptyMapError, match=f"constant \\(std 0 < {EMPTY_MAP_STD:g}\\)"):
        flat.refresh(3)


def test_figures_are_written_per_refresh(tmp_path):
    r = refiner(figures=tmp_path / "figures")
    r.refresh(3)
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "cycle_000_fam.png", "cycle_000_mfam.png", "cycle_000_samples.png"]


@pytest.mark.parametrize("changes, error, match", [
    (dict(cycle=0), ValueError, "cycle must be an int >= 1, got 0"),
    (dict(cycle=-5), ValueError, "cycle must be an int >= 1, got -5"),
    (dict(cycle=2.0), TypeError, "cycle must be an int"),
    (dict(base_steps=-1), ValueError, "base_steps must be an int >= 0"),
    (dict(mfam_samples=0), ValueError, "mfam_samples must be an int >= 1"),
    (dict(finetune_steps=-1), ValueError, "finetune_steps must be an int >= 0"),
    (dict(require_fam="yes"), TypeError, "require_fam must be a bool"),
    (dict(highlighter=3), TypeError, "highlighter must be a HighlighterRecipe, a FlawHighlighter or the path"),
    (dict(real_images=torch.rand(4, SIZE, SIZE)), ValueError, r"real_images must have 4 dims"),
    (dict(real_images=torch.rand(1, 1, SIZE, SIZE)), ValueError, "real_images must hold at least 2 images"),
    (dict(sampler="ddim"), TypeError, "sampler must be callable"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_arguments_are_refused(changes, error, match):
    kwargs = dict(highlighter=HighlighterRecipe(epochs=1, samples=8), real_images=real_images(), sampler=Sampler(),
                  base_steps=3, cycle=2)
    with pytest.raises(error, match=match):
        Refiner(**{**kwargs, **changes})


@pytest.mark.parametrize("changes, match", [
    (dict(epochs=0), "epochs must be an int >= 1, got 0"),
    (dict(samples=1), "samples must be an int >= 2, got 1"),
])
def test_bad_recipes_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        HighlighterRecipe(**changes)


def test_samples_must_split_evenly_over_the_ranks(monkeypatch):
    import srdiff.refiner

    monkeypatch.setattr(srdiff.refiner, "rank_and_world", lambda group=None: (0, 4))
    with pytest.raises(ValueError, match="mfam_samples must be a multiple of the world size 4 .* got 6"):
        refiner(mfam_samples=6)
    with pytest.raises(ValueError, match="recipe.samples must be a multiple of the world size 4 .* got 10"):
        refiner(highlighter=HighlighterRecipe(epochs=1, samples=10))


def _returns(value):
    return lambda n, seed, first_index: value(n)


@pytest.mark.parametrize("sampler, error, match", [
    (_returns(lambda n: torch.rand(n + 1, 1, SIZE, SIZE)), ValueError, r"shape \(9, 1, 8, 8\) for n=8; expected \(8, 1, 8, 8\)"),
    (_returns(lambda n: torch.rand(n, 3, SIZE, SIZE)), ValueError, r"expected \(8, 1, 8, 8\)"),
    (_returns(lambda n: torch.rand(n, 1, SIZE, SIZE) * 2 - 1), ValueError, r"images in \[-.*\]; expected values in \[0, 1\]"),
    (_returns(lambda n: torch.full((n, 1, SIZE, SIZE), float("nan"))), ValueError, "expected values in"),
    (_returns(lambda n: torch.randint(0, 255, (n, 1, SIZE, SIZE))), TypeError, "images must be a floating-point"),
    (_returns(lambda n: [torch.rand(1, SIZE, SIZE)] * n), TypeError, "images must be a torch.Tensor"),
    (_returns(lambda n: (torch.rand(n, 1, SIZE, SIZE), torch.rand(n, SIZE))), ValueError, "weights must have 3 dims"),
    (_returns(lambda n: (torch.rand(n, 1, SIZE, SIZE), -torch.rand(n, SIZE, SIZE))), ValueError, "weights that are negative"),
], ids=["rows", "channels", "range", "nan", "integer", "list", "weights-shape", "weights-negative"])
def test_a_bad_sampler_is_named_at_the_refresh(sampler, error, match):
    r = refiner(sampler=sampler)
    with pytest.raises(error, match=match):
        r.refresh(3)
