"""The text-to-image task on tiny random parts: captions (metadata.jsonl, generated digit captions), the
tiny tokenizer, caption dropout, guided prompts, training with refreshes, export round trips that load in
diffusers and generate (StableDiffusionPipeline), a local Stable Diffusion folder as ``pretrained``,
LoRA composing with the FAM processors, and resume after SIGKILL."""

import json

import pytest
import torch
from srdiff_testing import kill_and_resume, run_losses, tiny_config

import srdiff
from srdiff.trainer import SelfRefiningTrainer, checkpoint
from srdiff.trainer.captions import digit_caption, folder_captions
from srdiff.trainer.lora import add_lora
from srdiff.diffusion.seeding import initial_noise
from srdiff.trainer.text_encoders import check_pretrained, tiny_tokenizer
from srdiff.trainer.trained import load_trained

TEXT = dict(task="text", guidance_scale=2.0, condition_dropout=0.25)


def tiny_vae(path):
    """A one-level AutoencoderKL (8x8 pixels -> 4x4x4 latents), saved at ``path``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                  norm_num_groups=4, sample_size=8).save_pretrained(path)
    return str(path)


def caption_folder(tmp_path, n=6):
    from PIL import Image

    folder = tmp_path / "captioned"
    folder.mkdir()
    lines = []
    for i in range(n):
        Image.fromarray((torch.rand(8, 8) * 255).byte().numpy()).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a blob number {i % 2}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_captions_from_metadata_and_digits(tmp_path):
    folder = caption_folder(tmp_path)
    assert folder_captions(folder) == [f"a blob number {i % 2}" for i in range(6)]
    assert digit_caption(7) == "a handwritten digit seven"
    (folder / "metadata.jsonl").write_text((folder / "metadata.jsonl").read_text()
                                           + json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl, line 7 names image 'gone.png', which does not exist"):
        folder_captions(folder)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "only one"}) + "\n")
    with pytest.raises(ValueError, match=r"image .*1.png' has no line in"):
        folder_captions(folder)
    with pytest.raises(ValueError, match="task 'text' needs captions"):
        SelfRefiningTrainer(tiny_config(tmp_path, **TEXT, data="emoji"))


def test_tiny_tokenizer_has_word_tokens_for_digit_captions():
    tok = tiny_tokenizer()
    ids = tok("a handwritten digit seven").input_ids
    assert len(ids) == 6 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(tok("a quux").input_ids) == 2 + 1 + 4  # other words fall back to characters


def test_caption_dropout_prompts_and_guidance(tmp_path):
    trainer = SelfRefiningTrainer(tiny_config(tmp_path, **TEXT, steps=1))
    task, model = trainer.task, trainer.denoiser.eval()
    assert len(task.captions) == 10 and task.spec.cross_attention_dim == task.encoder.width
    idx = torch.arange(64)
    a, b = task.batch(idx, step=3, micro=0), task.batch(idx, step=3, micro=0)
    torch.testing.assert_close(a.cond.encoder_hidden_states, b.cond.encoder_hidden_states, rtol=0, atol=0)
    null = task.null_condition(1).encoder_hidden_states[0]
    dropped = (a.cond.encoder_hidden_states == null).flatten(1).all(1)
    assert 0.1 < dropped.float().mean() < 0.45
    sevens = task.prompt_condition(["a handwritten digit seven"] * 2).encoder_hidden_states
    labels = trainer.data.train_labels[idx]
    torch.testing.assert_close(a.cond.encoder_hidden_states[~dropped & (labels == 7)][0], sevens[0], rtol=0, atol=0)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor(30)
    cond = task.prompt_condition(["a handwritten digit seven", "a handwritten digit one"])
    with torch.no_grad():
        eps_c = model(x, t, encoder_hidden_states=cond.encoder_hidden_states).sample
        eps_u = model(x, t, encoder_hidden_states=task.null_condition(2).encoder_hidden_states).sample
        guided = task.guided_predict(model, 3.0)(x, t, cond)
    torch.testing.assert_close(guided, eps_u + 3.0 * (eps_c - eps_u), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eps_c, eps_u)
    with pytest.raises(TypeError, match="prompts must be a list of strings"):
        task.prompt_condition("a handwritten digit seven")


def test_text_task_end_to_end_pixels(tmp_path):
    """Pixel-space (the tiny CPU case): train through a refresh, only self-attention modulated, sample by
    prompt, export folders, load back, resume."""
    from diffusers import UNet2DConditionModel

    cfg = tiny_config(tmp_path, **TEXT, steps=4, ratio="1:1", cycle=2, checkpoint_every=2)
    trainer = SelfRefiningTrainer(cfg)
    assert trainer.fam_layers and all(name.endswith("attn1") for name in trainer.fam_layers)
    summary = trainer.train()
    assert trainer.mfam is not None
    trained = load_trained(summary["checkpoint"])
    torch.testing.assert_close(trained.task.table, trainer.task.table, rtol=0, atol=0)
    prompt = trained.task.prompt_condition(["a handwritten digit seven"] * 3)
    images = trained.sample(3, seed=0, steps=2, conditions=prompt)
    assert images.shape == (3, 1, 8, 8)
    torch.testing.assert_close(trained.sample(3, seed=0, steps=2, conditions=prompt), images, rtol=0, atol=0)
    out = trained.export(tmp_path / "export")
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    x, t = torch.randn(3, 1, 8, 8), torch.tensor(10)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=prompt.encoder_hidden_states).sample,
                                   trained.model(x, t, encoder_hidden_states=prompt.encoder_hidden_states).sample,
                                   rtol=0, atol=0)
    assert json.loads((out / "srdiff_task.json").read_text())["latent"] is False
    from srdiff.cli import main

    tensor = tmp_path / "sevens.pt"
    assert main(["sample", "--ckpt", summary["checkpoint"], "--n", "3", "--steps", "2", "--no-pngs", "--out",
                 str(tmp_path / "sevens.png"), "--tensor-out", str(tensor), "--prompt", "a handwritten digit seven"]) == 0
    torch.testing.assert_close(torch.load(tensor), images, rtol=0, atol=0)
    resumed = SelfRefiningTrainer(cfg)
    assert resumed.resume() and resumed.step == 4 and resumed.mfam is not None
    torch.testing.assert_close(resumed.task.table, trainer.task.table, rtol=0, atol=0)


def test_latent_export_is_a_stable_diffusion_pipeline_and_a_pretrained_folder(tmp_path):
    """A latent text model exports as a StableDiffusionPipeline (srdiff's text encoder, tokenizer, UNet and
    VAE exactly) that generates; the export is a local Stable Diffusion folder a new run can start from."""
    from diffusers import StableDiffusionPipeline

    cfg = tiny_config(tmp_path, **TEXT, vae=tiny_vae(tmp_path / "vae"), mode="baseline", steps=2)
    summary = SelfRefiningTrainer(cfg).train()
    trained = load_trained(summary["checkpoint"])
    pipe = StableDiffusionPipeline.from_pretrained(summary["pipeline"])
    prompts = ["a handwritten digit seven", "a handwritten digit one"]
    embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    ours = trained.task.prompt_condition(prompts).encoder_hidden_states
    torch.testing.assert_close(embeds, ours, rtol=0, atol=0)
    x, t = torch.randn(2, 4, 4, 4), torch.tensor(7)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=ours).sample,
                                   trained.model(x, t, encoder_hidden_states=ours).sample, rtol=0, atol=0)
    torch.testing.assert_close(pipe.vae.state_dict(), trained.vae.state_dict(), rtol=0, atol=0)
    images = pipe(prompts, height=8, width=8, num_inference_steps=3, guidance_scale=2.0,
                  latents=initial_noise((2, 4, 4, 4), 5, 0, "cpu"), output_type="pt").images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()

    check_pretrained(summary["pipeline"])
    again = tiny_config(tmp_path, "from_pretrained", **TEXT, pretrained=summary["pipeline"], mode="baseline", steps=1)
    assert again.vae == str(tmp_path / "run" / "pipeline" / "vae")
    resumed = SelfRefiningTrainer(again)
    for name, value in trained.model.state_dict().items():
        torch.testing.assert_close(resumed.denoiser.state_dict()[name], value, rtol=0, atol=0, msg=name)
    import shutil

    shutil.rmtree(tmp_path / "run" / "pipeline" / "tokenizer")
    with pytest.raises(ValueError, match=r"pretrained folder .* has no 'tokenizer' part"):
        tiny_config(tmp_path, **TEXT, pretrained=summary["pipeline"], mode="baseline")
    with pytest.raises(ValueError, match=r"pretrained .*is for task 'text'"):
        tiny_config(tmp_path, pretrained=summary["pipeline"], mode="baseline")


def test_lora_composes_with_fam_and_exports_adapters_only(tmp_path):
    from diffusers import StableDiffusionPipeline

    from srdiff.trainer.lora import has_lora

    cfg = tiny_config(tmp_path, **TEXT, vae=tiny_vae(tmp_path / "vae"), mode="latent", lora_rank=2, steps=4,
                      ratio="1:1", cycle=2, lr=1e-2)
    trainer = SelfRefiningTrainer(cfg)
    before = {k: v.clone() for k, v in trainer.denoiser.state_dict().items()}
    assert trainer.fam_layers and all(n.endswith("attn1") for n in trainer.fam_layers)
    trainer.train()
    after = trainer.denoiser.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    # the FAM processor runs through the LoRA projections: the map changes the output, the adapters too
    model = trainer.ema.model
    x, t = torch.randn(1, 4, 4, 4), torch.tensor(20)
    ctx = trainer.task.prompt_condition(["a handwritten digit one"]).encoder_hidden_states
    with torch.no_grad():
        plain = model(x, t, encoder_hidden_states=ctx).sample
        with srdiff.fam_context(torch.ones(8, 8)):
            modulated = model(x, t, encoder_hidden_states=ctx).sample
        model.disable_adapters()
        without_lora = model(x, t, encoder_hidden_states=ctx).sample
        model.enable_adapters()
    assert not torch.allclose(plain, modulated) and not torch.allclose(plain, without_lora)

    out = trainer.task.export(model, tmp_path / "export")
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert not has_lora(pipe.unet)
    pipe.load_lora_weights(out)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=ctx).sample, plain, rtol=1e-5, atol=1e-5)
    assert pipe("a handwritten digit one", height=8, width=8, num_inference_steps=2, output_type="pt").images.shape \
        == (1, 1, 8, 8)
    on_base = trainer.task
    on_base.config = cfg.replace(pretrained=str(out), vae=str(out / "vae"))
    adapters_only = on_base.export(model, tmp_path / "adapters")
    assert sorted(p.name for p in adapters_only.iterdir()) == ["pytorch_lora_weights.safetensors", "srdiff_task.json"]
    with pytest.raises(ValueError, match=r"lora_rank=2 needs attention layers .* Sequential has none"):
        add_lora(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1)), 2)


@pytest.mark.slow
def test_text_resume_after_sigkill_is_exact(tmp_path):
    ref_cfg = tiny_config(tmp_path, "uninterrupted", **TEXT, steps=10, cycle=2, checkpoint_every=3, mode="reverse")
    SelfRefiningTrainer(ref_cfg).train()
    cfg = ref_cfg.replace(out_dir=str(tmp_path / "killed"))
    kill_and_resume(cfg, after_step=7, checkpoint_step=6)
    assert run_losses(cfg) == run_losses(ref_cfg)
    a = checkpoint.load(tmp_path / "uninterrupted" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "killed" / "checkpoints" / "last.pt")
    torch.testing.assert_close(b["model"], a["model"], rtol=0, atol=0)
    torch.testing.assert_close(b["ema"]["model"], a["ema"]["model"], rtol=0, atol=0)
