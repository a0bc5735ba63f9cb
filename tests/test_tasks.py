"""The task seam: the registry, backbones, and the class-conditional task end to end (train, refresh,
sample with guidance, export, load, resume) on tiny models."""

import pytest
import torch

import srdiff
from srdiff.trainer import SelfRefiningTrainer, TrainConfig
from srdiff.trainer.backbones import BACKBONES, Condition, DenoiserSpec, get_backbone
from srdiff.trainer.task import TASKS
from srdiff.trainer.tasks import get_task, task_names
from srdiff.trainer.trained import load_trained
from srdiff_testing import tiny_config


def test_registries_name_their_members():
    assert {"unconditional", "class"} <= set(task_names())
    assert {"unet", "unet-cond"} <= set(BACKBONES)
    with pytest.raises(ValueError, match=r"task must be one of .*got 'dreams'"):
        TrainConfig(task="dreams")
    with pytest.raises(ValueError, match=r"backbone must be 'auto' or one of .*got 'mlp'"):
        TrainConfig(backbone="mlp")
    with pytest.raises(ValueError, match=r"backbone 'unet' cannot take \['text'\]"):
        get_backbone("unet").build(TrainConfig(), DenoiserSpec(1, 1, 8, cross_attention_dim=16))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_states_the_sides_it_takes(name):
    """Each backbone's size rule is the truth: a side it accepts denoises to its own shape, a side it
    refuses (naming the sizes that fit) would not have (diffusers' own error, or a cropped output)."""
    backbone = get_backbone(name)
    config = TrainConfig(task="text" if name == "sd3" else "unconditional", backbone=name, image_size=16,
                         block_out_channels=(8, 16, 16), attention_levels=(False, True, True), norm_num_groups=4,
                         hidden_size=16, depth=2, attention_head_dim=8)
    text = name == "sd3"
    for side in range(8, 14):
        spec = DenoiserSpec(1, 1, side, cross_attention_dim=8 if text else None)
        cond = Condition(encoder_hidden_states=torch.randn(2, 3, 8)) if text else Condition()
        x = torch.randn(2, 1, side, side)
        try:
            with torch.no_grad():
                fits = backbone.forward(backbone.build(config, spec), x, torch.tensor([3, 5]), cond).shape == x.shape
        except (RuntimeError, ValueError):  # diffusers' shape errors, srdiff.UViT's own check
            fits = False
        if fits:
            backbone.check_sample_size(config.replace(image_size=side), side)
        else:
            with pytest.raises(ValueError, match=rf"image_size {side} does not fit backbone '{name}': .* would"):
                backbone.check_sample_size(config.replace(image_size=side), side)


def test_backbones_own_their_options_and_export():
    """Each backbone names the [model] keys it reads and checks them when the config is made; what it
    does not read it does not check. Export asks the backbone: a pipeline, or its folder."""
    import dataclasses

    model_keys = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["section"] == "model"}
    for name, cls in BACKBONES.items():
        assert cls.options and set(cls.options) <= model_keys, name
        assert cls.folder in ("unet", "transformer"), name
    with pytest.raises(ValueError, match=r"hidden_size 20 must be a multiple of attention_head_dim 8"):
        TrainConfig(backbone="dit", hidden_size=20, attention_head_dim=8)
    with pytest.raises(ValueError, match=r"norm_num_groups must divide every entry of block_out_channels"):
        TrainConfig(backbone="unet-cond", norm_num_groups=7)
    assert TrainConfig(backbone="dit", norm_num_groups=7).norm_num_groups == 7  # a U-Net key: not DiT's to check
    unet = get_backbone("unet").build(TrainConfig(), DenoiserSpec(1, 1, 8))
    assert type(get_backbone("unet").pipeline(unet, TrainConfig())).__name__ == "DDPMPipeline"
    assert get_backbone("unet").pipeline(unet, TrainConfig(), condition="class") is None
    with pytest.raises(ValueError, match=r"pretrained Stable Diffusion UNet needs backbone 'unet-cond', got 'dit'"):
        get_backbone("dit").from_pretrained("sd15/unet")


def test_legacy_config_keys_become_recipes():
    old = TrainConfig().to_dict()
    del old["recipe"]
    assert TrainConfig.from_dict({**old, "amplify": "scale", "amplified_target": False}).recipe == "adm"
    assert TrainConfig.from_dict({**old, "amplify": "add", "amplified_target": True}).recipe == "paper"
    with pytest.raises(ValueError, match="no named recipe"):
        TrainConfig.from_dict({**old, "amplify": "scale", "amplified_target": True})


def test_class_task_needs_labels(tmp_path):
    images = torch.rand(20, 1, 8, 8)
    torch.save(images, tmp_path / "images.pt")
    with pytest.raises(ValueError, match="task 'class' needs labelled data"):
        SelfRefiningTrainer(tiny_config(tmp_path, task="class", data=str(tmp_path / "images.pt")))
    with pytest.raises(ValueError, match="num_classes 3 is smaller than the data's 10 classes"):
        SelfRefiningTrainer(tiny_config(tmp_path, task="class", num_classes=3))


def test_class_task_on_a_users_labelled_folder(tmp_path):
    """An image folder with one subfolder per class trains the class task (no flag needed); the class names
    travel with the checkpoint and the export. A tensor file takes its labels from a labels file."""
    import json

    from PIL import Image

    for i in range(10):
        folder = tmp_path / "shapes" / ("ring" if i % 2 else "bar")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((torch.rand(8, 8) * 255).byte().numpy()).save(folder / f"{i}.png")
    cfg = tiny_config(tmp_path, task="class", data=str(tmp_path / "shapes"), steps=1, ratio="1:0", mode="baseline")
    trainer = SelfRefiningTrainer(cfg)
    assert trainer.task.num_classes == 2 and trainer.task.class_names == ["bar", "ring"]
    summary = trainer.train()
    assert load_trained(summary["checkpoint"]).task.class_names == ["bar", "ring"]
    assert json.loads((tmp_path / "run" / "pipeline" / "srdiff_task.json").read_text())["class_names"] == ["bar", "ring"]
    torch.save(torch.rand(6, 1, 8, 8), tmp_path / "images.pt")
    (tmp_path / "labels.csv").write_text("index,label\n" + "".join(f"{i},{i % 3}\n" for i in range(6)))
    tensors = SelfRefiningTrainer(cfg.replace(data=str(tmp_path / "images.pt"), labels=str(tmp_path / "labels.csv"),
                                              out_dir=str(tmp_path / "tensors")))
    assert tensors.task.num_classes == 3 and tensors.task.class_names is None


def test_label_dropout_is_keyed_and_uses_the_null_class(tmp_path):
    cfg = tiny_config(tmp_path, task="class", condition_dropout=0.5, steps=2)
    task = get_task(cfg)
    trainer = SelfRefiningTrainer(cfg)
    task = trainer.task
    idx = torch.arange(64)
    a, b = task.batch(idx, step=3, micro=1), task.batch(idx, step=3, micro=1)
    assert torch.equal(a.cond.class_labels, b.cond.class_labels)
    dropped = a.cond.class_labels == task.num_classes
    assert 0.3 < dropped.float().mean() < 0.7
    kept = ~dropped
    assert torch.equal(a.cond.class_labels[kept], trainer.data.train_labels[idx][kept])
    assert not torch.equal(task.batch(idx, step=4, micro=1).cond.class_labels, a.cond.class_labels)


def test_guided_prediction_mixes_the_two_branches(tmp_path):
    trainer = SelfRefiningTrainer(tiny_config(tmp_path, task="class", steps=1))
    task, model = trainer.task, trainer.denoiser.eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor(50)
    cond = task.labels_condition(torch.tensor([0, 4, 9]))
    with torch.no_grad():
        eps_c = model(x, t, class_labels=cond.class_labels).sample
        eps_u = model(x, t, class_labels=task.null_condition(3).class_labels).sample
        guided = task.guided_predict(model, 3.0)(x, t, cond)
        plain = task.guided_predict(model, 1.0)(x, t, cond)
    torch.testing.assert_close(guided, eps_u + 3.0 * (eps_c - eps_u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, eps_c, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 10\), got 10"):
        task.labels_condition(torch.tensor([1, 10]))


@pytest.mark.parametrize("backbone", ["unet", "unet-cond"])
def test_class_task_end_to_end(tmp_path, backbone):
    """Train (base + refreshes), sample by class with guidance, export, load back."""
    cfg = tiny_config(tmp_path, task="class", backbone=backbone, steps=4, ratio="1:1", cycle=2, mode="combined",
                      guidance_scale=2.0, checkpoint_every=2)
    summary = SelfRefiningTrainer(cfg).train()
    assert summary["task"] == "class"
    trained = load_trained(summary["checkpoint"])
    assert trained.task.num_classes == 10 and trained.task.condition == "class"
    sevens = trained.sample(4, seed=0, steps=2, conditions=trained.task.labels_condition([7] * 4))
    assert sevens.shape == (4, 1, 8, 8) and 0 <= sevens.min() and sevens.max() <= 1
    again = trained.sample(4, seed=0, steps=2, conditions=trained.task.labels_condition([7] * 4))
    torch.testing.assert_close(sevens, again, rtol=0, atol=0)
    threes = trained.sample(4, seed=0, steps=2, conditions=trained.task.labels_condition([3] * 4))
    assert not torch.equal(sevens, threes)

    pipe_dir = tmp_path / "export"
    trained.export(pipe_dir)
    exported = type(trained.model).from_pretrained(pipe_dir / "unet").eval()
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor(10), torch.tensor([7, 10])
    with torch.no_grad():
        ours = trained.task.predict(trained.model, x, t, _batch(x, labels))
        theirs = trained.task.predict(exported, x, t, _batch(x, labels))
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)


def test_class_task_resumes_after_ctrl_c_as_if_uninterrupted(tmp_path, monkeypatch):
    """Ctrl-C at step 4 writes last.pt there; resuming repeats the uninterrupted run's losses exactly."""
    cfg = tiny_config(tmp_path, "whole", task="class", steps=6, ratio="1:1", cycle=2, checkpoint_every=100)
    SelfRefiningTrainer(cfg).train()
    broken = cfg.replace(out_dir=str(tmp_path / "broken"))
    trainer = SelfRefiningTrainer(broken)
    step = trainer.train_step

    def interrupted():
        if trainer.step == 4:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert torch.load(tmp_path / "broken" / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    SelfRefiningTrainer(broken).train(resume=True)
    assert _losses(broken) == _losses(cfg)


def _losses(cfg) -> list[tuple[int, float]]:
    import json

    with open(f"{cfg.out_dir}/metrics.jsonl") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def _batch(x, labels):
    from srdiff.trainer.task import Batch

    return Batch(x0=x, cond=Condition(class_labels=labels))


def test_sampling_conditions_depend_on_the_image_index_only(tmp_path):
    trainer = SelfRefiningTrainer(tiny_config(tmp_path, task="class", steps=1))
    task = trainer.task
    whole = task.sample_conditions(torch.arange(0, 6), seed=5).class_labels
    tail = task.sample_conditions(torch.arange(3, 6), seed=5).class_labels
    assert torch.equal(whole[3:], tail)
    assert set(task.sample_conditions(torch.arange(200), seed=1).class_labels.tolist()) == set(range(10))


def test_unconditional_task_is_the_default(tmp_path):
    trainer = SelfRefiningTrainer(tiny_config(tmp_path, steps=1))
    assert type(trainer.task) is TASKS["unconditional"]
    assert isinstance(trainer.denoiser, __import__("diffusers").UNet2DModel)
    assert trainer.denoiser.config.num_class_embeds is None
    with pytest.raises(NotImplementedError, match="no condition to guide"):
        trainer.task.null_condition(2)
    for scale in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ValueError, match=rf"guidance_scale must be a finite number >= 0 .*got {scale}"):
            trainer.task.sample(trainer.ema.model, 2, seed=0, steps=1, guidance_scale=scale)
    assert srdiff.TrainConfig is TrainConfig


@pytest.mark.parametrize("task, backbone", [("class", "dit"), ("unconditional", "dit"), ("text", "sd3"),
                                           ("class", "uvit"), ("unconditional", "uvit")])
def test_transformer_backbones_refine_and_export(tmp_path, task, backbone):
    """DiT and SD3 train through the base phase and a modulated refinement phase, and export to folders
    whose model reloads with the same predictions."""
    cfg = tiny_config(tmp_path, task=task, backbone=backbone, steps=4, ratio="1:1", cycle=2, mode="combined",
                      hidden_size=16, depth=2, attention_head_dim=8)
    trainer = SelfRefiningTrainer(cfg)
    assert trainer.fam_layers, "no attention layer is modulated"
    summary = trainer.train()
    assert trainer.mfam is not None
    trained = load_trained(summary["checkpoint"])
    exported = type(trained.model).from_pretrained(f"{summary['pipeline']}/transformer").eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 60])
    cond = trained.task.sample_conditions(torch.arange(2), seed=0) or Condition()
    with torch.no_grad():
        ours = trained.task.predict(trained.model, x, t, _batch_of(x, cond))
        theirs = trained.task.predict(exported, x, t, _batch_of(x, cond))
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    images = trained.sample(2, seed=0, steps=2)
    assert images.shape == (2, 1, 8, 8)


def _batch_of(x, cond):
    from srdiff.trainer.task import Batch

    return Batch(x0=x, cond=cond)


def test_per_layer_projections_train_with_the_denoiser(tmp_path):
    """fam_projection='per_layer': one learned M_emb per attention layer, registered in the denoiser, so the
    optimiser, the EMA, checkpoints and DDP see them; export drops them (sampling needs no map)."""
    cfg = tiny_config(tmp_path, mode="reverse", fam_projection="per_layer", steps=4, ratio="1:1", cycle=2)
    trainer = SelfRefiningTrainer(cfg)
    projections = srdiff.fam_parameters(trainer.denoiser)
    assert len(trainer.fam_layers) >= 1 and projections
    before = [p.detach().clone() for p in projections]
    summary = trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, projections)), "the projections were not trained"
    state = torch.load(summary["checkpoint"], weights_only=True)
    assert sum("fam_projection" in k for k in state["model"]) == len(projections)
    assert TrainConfig.from_dict({**cfg.to_dict(), "fam_projection": True}).fam_projection == "shared"
    exported = __import__("diffusers").DDPMPipeline.from_pretrained(summary["pipeline"]).unet
    assert not any("fam_projection" in k for k in exported.state_dict())
