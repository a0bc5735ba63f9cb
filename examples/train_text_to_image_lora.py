"""Text-to-image LoRA fine-tuning of a Stable Diffusion UNet with 🤗 Accelerate and peft, in the shape of
diffusers' ``examples/text_to_image/train_text_to_image_lora.py``, with self-refining diffusion
(arXiv 2512.08774) added: the lines marked ``# srdiff:``.

    accelerate launch --mixed_precision bf16 examples/train_text_to_image_lora.py \\
        --pretrained_model_name_or_path ./sd15 --train_data_dir captioned/ --resolution 512 --rank 8 \\
        --max_train_steps 2000 --output_dir runs/lora

``--train_data_dir`` is an image folder with a ``metadata.jsonl`` of ``{"file_name": ..., "text": ...}`` lines
(the 🤗 datasets imagefolder layout). A latent model takes the method's attention half only: the FAM processors
scale the self-attention keys and values of the UNet by 1 + lam_r * mFAM (the mFAM in image space, resized to
each layer's latent grid); the forward half amplifies pixel noise and does not apply to latents, so the noise
and loss are srdiff's fused ones without a map (keyed draws). The refinement cycle (srdiff.Refiner) trains a
flaw highlighter on pipeline samples of training captions at ``--refine_start`` and refreshes the mFAM every
``--refine_cycle`` steps. N processes train what one process accumulating N micro-batches trains.
"""

import argparse
import json
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from torchvision import transforms
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

import srdiff  # srdiff: processors, noise and loss, the refinement cycle
from srdiff.diffusion.seeding import image_generators, key  # srdiff: keyed draws

logger = get_logger(__name__)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Text-to-image LoRA with self-refinement.")
    parser.add_argument("--pretrained_model_name_or_path", required=True,
                        help="a local Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    parser.add_argument("--train_data_dir", required=True, help="images with a metadata.jsonl of captions")
    parser.add_argument("--output_dir", default="sd-lora")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--center_crop", action="store_true", help="center-crop instead of random-crop")
    parser.add_argument("--random_flip", action="store_true", help="random horizontal flips")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--train_batch_size", type=int, default=16, help="per process")
    parser.add_argument("--max_train_steps", type=int, default=2000)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--lr_scheduler", default="constant")
    parser.add_argument("--lr_warmup_steps", type=int, default=500)
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--adam_epsilon", type=float, default=1e-8)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                        help="bf16 on a GPU (the frozen parts are kept in it); the CPU trains in fp32")
    parser.add_argument("--checkpointing_steps", type=int, default=500, help="accelerator.save_state every N steps")
    parser.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-N folder, or 'latest'")
    parser.add_argument("--report_to", default=None, help="an accelerate tracker (tensorboard, wandb, ...)")
    parser.add_argument("--seed", type=int, default=0)
    refine = parser.add_argument_group("self-refinement (srdiff)")
    refine.add_argument("--refine_start", type=int, default=None, help="base steps (default: half of max_train_steps)")
    refine.add_argument("--refine_cycle", type=int, default=100, help="steps between mFAM refreshes")
    refine.add_argument("--lam_r", type=float, default=0.025, help="attention K/V modulation")
    refine.add_argument("--mfam_samples", type=int, default=64, help="samples per refresh, over all processes")
    refine.add_argument("--refine_sampler_steps", type=int, default=20, help="DDIM steps of the refresh samples")
    refine.add_argument("--refine_guidance_scale", type=float, default=7.5, help="their classifier-free guidance")
    refine.add_argument("--highlighter", default=None, help="a saved srdiff.FlawHighlighter (default: train one)")
    refine.add_argument("--highlighter_epochs", type=int, default=10)
    refine.add_argument("--highlighter_samples", type=int, default=256)
    refine.add_argument("--highlighter_finetune_steps", type=int, default=0)
    refine.add_argument("--highlighter_real_images", type=int, default=1024, help="real images the highlighter sees")
    refine.add_argument("--require_fam", action="store_true", help="stop on an empty or constant mFAM")
    args = parser.parse_args(input_args)
    if args.refine_start is None:
        args.refine_start = args.max_train_steps // 2
    return args


class CaptionedImages(torch.utils.data.Dataset):
    """``root/metadata.jsonl`` lines ``{"file_name", "text"}``: the images (RGB) and their captions."""

    def __init__(self, root, transform):
        root = Path(root)
        if not (root / "metadata.jsonl").is_file():
            raise ValueError(f"--train_data_dir {str(root)!r} has no metadata.jsonl of captions")
        rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines() if line.strip()]
        self.paths, self.captions = [root / r["file_name"] for r in rows], [r["text"] for r in rows]
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return {"pixel_values": self.transform(Image.open(self.paths[i]).convert("RGB")), "caption": self.captions[i]}


def main(args):
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    set_seed(args.seed)

    root = args.pretrained_model_name_or_path
    noise_scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
    for frozen in (unet, vae, text_encoder):
        frozen.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    srdiff.set_fam_attn_processor(unet, lam=args.lam_r)  # srdiff: FAM processors on the self-attention layers
    for model in (unet, vae, text_encoder):
        model.to(accelerator.device, dtype=weight_dtype)
    cast_training_params(unet, dtype=torch.float32)  # the adapters train in fp32
    lora_parameters = [p for p in unet.parameters() if p.requires_grad]
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(accelerator.device)  # srdiff: the noise ops' schedule

    augmentations = transforms.Compose([
        transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(args.resolution) if args.center_crop else transforms.RandomCrop(args.resolution),
        transforms.RandomHorizontalFlip() if args.random_flip else transforms.Lambda(lambda x: x),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])
    dataset = CaptionedImages(args.train_data_dir, augmentations)

    def collate(rows):
        ids = tokenizer([r["caption"] for r in rows], max_length=tokenizer.model_max_length, padding="max_length",
                        truncation=True, return_tensors="pt").input_ids
        return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]), "input_ids": ids}

    train_dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True,
                                                   collate_fn=collate, generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW(lora_parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    # The prepared scheduler steps once per process and optimiser step (diffusers' convention).
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader,
                                                                          lr_scheduler)

    # srdiff: the refinement cycle. Its sampler draws this process's share of a refresh's images with the
    # current adapters, for training captions keyed by image index; image i starts from its own generator.
    plain = transforms.Compose(augmentations.transforms[:2] + [transforms.ToTensor()])
    real = CaptionedImages(args.train_data_dir, plain)
    real_images = torch.stack([real[i]["pixel_values"] for i in range(min(len(real), args.highlighter_real_images))])

    @torch.no_grad()
    def sample(n, seed, first_index):
        pipeline = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=accelerator.unwrap_model(unet),
            scheduler=DDIMScheduler.from_config(noise_scheduler.config), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipeline.set_progress_bar_config(disable=True)
        prompts = [dataset.captions[key(seed, i) % len(dataset)] for i in range(first_index, first_index + n)]
        with accelerator.autocast():
            images = pipeline(prompts, height=args.resolution, width=args.resolution, output_type="np",
                              num_inference_steps=args.refine_sampler_steps, guidance_scale=args.refine_guidance_scale,
                              generator=image_generators(seed, first_index, n)).images
        return torch.from_numpy(images).permute(0, 3, 1, 2).float().clamp(0, 1).to(accelerator.device)

    refiner = srdiff.Refiner(  # srdiff
        args.highlighter or srdiff.HighlighterRecipe(epochs=args.highlighter_epochs, samples=args.highlighter_samples),
        real_images.to(accelerator.device), sample, base_steps=args.refine_start, cycle=args.refine_cycle,
        mfam_samples=args.mfam_samples, finetune_steps=args.highlighter_finetune_steps, seed=args.seed,
        require_fam=args.require_fam, figures=output_dir / "refinement")
    accelerator.register_for_checkpointing(refiner)  # srdiff: the mFAM and the highlighter in every checkpoint

    if accelerator.is_main_process:
        accelerator.init_trackers("text2image-lora", config=vars(args))
    global_step = 0
    if args.resume_from_checkpoint:
        path = args.resume_from_checkpoint
        if path == "latest":
            folders = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            path = folders[-1] if folders else None
        if path is None:
            accelerator.print("no checkpoint to resume from: starting afresh")
        else:
            accelerator.load_state(str(path))
            global_step = int(Path(path).name.split("-")[1])
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    first_epoch, skip = divmod(global_step * args.gradient_accumulation_steps, len(train_dataloader))

    logger.info(f"{len(dataset)} captioned images, {args.max_train_steps} steps of {args.train_batch_size} x "
                f"{accelerator.num_processes} processes x {args.gradient_accumulation_steps} accumulated")
    progress = tqdm(range(args.max_train_steps), initial=global_step, disable=not accelerator.is_local_main_process)
    micro_batches, losses, train_loss = global_step * args.gradient_accumulation_steps, [], 0.0
    for epoch in range(first_epoch, math.ceil(args.max_train_steps / steps_per_epoch)):
        unet.train()
        loader = accelerator.skip_first_batches(train_dataloader, skip) if epoch == first_epoch else train_dataloader
        for batch in loader:
            # srdiff: the keys of this micro-batch's draws (its index in the global order of micro-batches)
            micro = micro_batches * accelerator.num_processes + accelerator.process_index
            micro_batches += 1
            with torch.no_grad():
                posterior = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist
                latents = posterior.sample(torch.Generator().manual_seed(key(args.seed, micro, 2)))
                latents = (latents * vae.config.scaling_factor).float()
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),),
                                      generator=torch.Generator().manual_seed(key(args.seed, micro))).to(latents.device)
            mfam = refiner.step(global_step)  # srdiff: None in the base phase, refreshed every cycle
            noisy_latents, _ = srdiff.amplified_add_noise(  # srdiff: keyed noise (no map: latents)
                latents, timesteps, alphas_cumprod, seed=key(args.seed, micro, 1),
                prediction_type=noise_scheduler.config.prediction_type, return_target=False)

            with accelerator.accumulate(unet):
                with srdiff.fam_context(mfam):  # srdiff: K and V scaled by 1 + lam_r * mFAM
                    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = srdiff.amplified_noise_loss(  # srdiff: the fused loss, epsilon regenerated from the key
                    model_pred.float(), latents, timesteps, alphas_cumprod, seed=key(args.seed, micro, 1),
                    prediction_type=noise_scheduler.config.prediction_type)
                train_loss += accelerator.gather(loss.detach()[None]).mean().item() / args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_parameters, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                global_step += 1
                progress.update(1)
                logs = {"loss": train_loss, "lr": lr_scheduler.get_last_lr()[0], "mfam": mfam is not None}
                logs.update(refiner.metrics(global_step - 1))  # srdiff: the numbers of a refresh before this step
                accelerator.log(logs, step=global_step)
                progress.set_postfix(loss=f"{train_loss:.4f}")
                losses.append(train_loss)
                train_loss = 0.0
                if global_step % args.checkpointing_steps == 0:
                    accelerator.save_state(str(output_dir / f"checkpoint-{global_step}"))
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(accelerator.unwrap_model(unet)))
        StableDiffusionPipeline.save_lora_weights(save_directory=output_dir, unet_lora_layers=lora,
                                                  safe_serialization=True)
        if refiner.highlighter is not None:
            refiner.highlighter.save(output_dir / "highlighter.pt")  # srdiff
    accelerator.end_training()
    return {"losses": losses, "refiner": refiner}


if __name__ == "__main__":
    main(parse_args())
