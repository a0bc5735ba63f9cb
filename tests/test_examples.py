"""The accelerate examples (examples/, scripts: run, never imported) on tiny random models: two gloo processes
(``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2``) finish, hold the same mFAM, and
train the loss curve of one process accumulating the same global batch in two micro-batches."""

import json
import socket
import subprocess
import sys

import pytest
import torch

from srdiff_testing import REPO, assert_close, launch_env, saved_highlighter

# Runs an example's main() in each process (runpy executes the script; nothing imports `examples`) and keeps
# what the test compares: the per-step losses, this rank's mFAM and the refresh records.
_RUNNER = """
import os, runpy, sys, torch
script, out = sys.argv[1], sys.argv[2]
example = runpy.run_path(script, run_name="srdiff_example")
result = example["main"](example["parse_args"](sys.argv[3:]))  # accelerator.end_training() ends the group
torch.save({"losses": torch.tensor(result["losses"], dtype=torch.float64), "mfam": result["refiner"].mfam.cpu(),
            "world": int(os.environ.get("WORLD_SIZE", "1"))}, f"{out}/rank{os.environ.get('RANK', '0')}.pt")
"""

# 6 optimiser steps of a global batch of 4: 2 base steps, refreshes before steps 2 and 4 (4 samples of 2 DDIM
# steps, the saved highlighter as it is: the default, no fine-tune). A fine-tune is left out here because
# AdamW's first steps move each weight by about lr whatever its gradient's size (m / sqrt(v) is the gradient's
# sign), so samples that differ by float rounding (all-reduce vs accumulation) give highlighters, and maps,
# that differ by O(lr), not by a rounding bound. The fine-tune on 2 ranks (rank 0 fits, the weights broadcast,
# the same map bytes on both) is tested by tests/test_trainer_fsdp.py (TINY_TRAIN fine-tunes once per refresh).
COMMON = ["--resolution", "16", "--center_crop", "--max_train_steps", "6", "--refine_start", "2", "--refine_cycle",
          "2", "--mfam_samples", "4", "--refine_sampler_steps", "2", "--highlighter_finetune_steps", "0",
          "--learning_rate", "1e-3", "--lr_warmup_steps", "2", "--checkpointing_steps", "4", "--seed", "3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """32 digits at 16 px with captions, a saved highlighter per channel count, a tiny UNet config and a tiny
    Stable Diffusion folder (random weights: nothing is downloaded)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel
    from PIL import Image
    from sklearn.datasets import load_digits
    from transformers import CLIPTextConfig, CLIPTextModel

    from srdiff.trainer.captions import digit_caption
    from srdiff.trainer.text_encoders import TINY_TEXT_ENCODER, tiny_tokenizer

    root = tmp_path_factory.mktemp("examples")
    digits = load_digits()
    (root / "digits").mkdir()
    lines = []
    for i in range(32):
        pixels = (digits.images[i] / 16 * 255).astype("uint8")
        Image.fromarray(pixels).resize((16, 16), Image.BILINEAR).save(root / "digits" / f"{i:02d}.png")
        lines.append(json.dumps({"file_name": f"{i:02d}.png", "text": digit_caption(int(digits.target[i]))}))
    (root / "digits" / "metadata.jsonl").write_text("\n".join(lines) + "\n")

    torch.manual_seed(0)
    for channels in (1, 3):
        saved_highlighter(root / f"hl{channels}.pt", channels=channels, size=16)
    UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                norm_num_groups=4, attention_head_dim=8).save_config(root / "unet_config")

    sd = root / "sd"
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(sd / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 **TINY_TEXT_ENCODER)).save_pretrained(sd / "text_encoder")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                  norm_num_groups=4, sample_size=16).save_pretrained(sd / "vae")
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
                         attention_head_dim=(1, 2), cross_attention_dim=TINY_TEXT_ENCODER["hidden_size"]
                         ).save_pretrained(sd / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(sd / "scheduler")
    return root


EXAMPLES = {
    "unconditional": ("train_unconditional.py", lambda d: ["--train_data_dir", str(d / "digits"), "--use_ema",
                                                           "--model_config_name_or_path", str(d / "unet_config"),
                                                           "--highlighter", str(d / "hl1.pt"), "--ddpm_num_steps",
                                                           "100", "--lr_scheduler", "constant_with_warmup"]),
    "text_to_image_lora": ("train_text_to_image_lora.py", lambda d: ["--train_data_dir", str(d / "digits"),
                                                                     "--pretrained_model_name_or_path", str(d / "sd"),
                                                                     "--highlighter", str(d / "hl3.pt"), "--rank", "2",
                                                                     "--gradient_checkpointing",
                                                                     "--refine_guidance_scale", "2"]),
}


def run_example(script: str, args: list[str], out, *, processes: int) -> list[dict]:
    """The example on ``processes`` gloo processes (a plain process for 1); each process's saved results."""
    runner = out.parent / f"{out.name}-runner.py"
    runner.write_text(_RUNNER)
    out.mkdir()
    command = [sys.executable, str(runner)]
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--main_process_port", str(port), str(runner)]
    proc = subprocess.run([*command, str(REPO / "examples" / script), str(out), *args, "--output_dir", str(out)],
                          capture_output=True, text=True, timeout=600, env=launch_env(ACCELERATE_USE_CPU="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(processes)]


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_two_processes_train_what_one_process_accumulating_trains(data, tmp_path, name):
    script, args = EXAMPLES[name]
    two = run_example(script, [*COMMON, *args(data), "--train_batch_size", "2"], tmp_path / "two", processes=2)
    one = run_example(script, [*COMMON, *args(data), "--train_batch_size", "2", "--gradient_accumulation_steps", "2"],
                      tmp_path / "one", processes=1)
    assert [r["world"] for r in two] == [2, 2] and one[0]["world"] == 1
    assert float(two[0]["mfam"].max()) > 0  # a real map, not a trivially equal blank
    assert torch.equal(two[0]["mfam"], two[1]["mfam"])  # all-reduced: the same bytes on both processes
    assert torch.equal(two[0]["losses"], two[1]["losses"]) and len(two[0]["losses"]) == 6
    # The same micro-batches, timesteps and noise; the weights differ by the order of floating-point sums
    # (the gradient all-reduce vs accumulation), as in tests/test_trainer_ddp.py: the losses agree within
    # the table's float32 forward entry, the last map within the 1e-3 its weights do.
    assert_close(two[0]["losses"], one[0]["losses"], dtype=torch.float32, name=f"{name} losses")
    mfam = two[0]["mfam"]
    torch.testing.assert_close(one[0]["mfam"], mfam, rtol=1e-3, atol=1e-3 * float(mfam.max()))
    out = tmp_path / "two"
    assert (out / "highlighter.pt").is_file() and (out / "refinement" / "cycle_001_mfam.png").is_file()
    saved = [torch.load(p, weights_only=True) for p in sorted((out / "checkpoint-4").glob("custom_checkpoint_*.pkl"))]
    assert any(isinstance(s, dict) and s.get("mfam") is not None for s in saved)  # the refiner's state
