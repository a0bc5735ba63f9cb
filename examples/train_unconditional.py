"""Unconditional image generation with 🤗 Accelerate, in the shape of diffusers'
``examples/unconditional_image_generation/train_unconditional.py``, with self-refining diffusion
(arXiv 2512.08774) added: the lines marked ``# srdiff:``.

    accelerate launch examples/train_unconditional.py --train_data_dir images/ --resolution 32 \\
        --model_config_name_or_path unet_config/ --max_train_steps 2000 --output_dir runs/uncond

Self-refinement is three things: the FAM processors in the UNet's attention (K and V scaled by
1 + lam_r * mFAM), the noise amplified by the mFAM (lam_f) in the noising and the loss, and the
refinement cycle (srdiff.Refiner), which trains a flaw highlighter on samples of the EMA model at
``--refine_start`` and refreshes the mFAM every ``--refine_cycle`` steps. Every random draw of a step is
keyed by (seed, global micro-batch), so N processes train what one process accumulating N micro-batches
trains (random crops and ``--random_flip`` aside: torchvision draws them from each process's own generator).
"""

import argparse
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from torchvision import transforms
from tqdm.auto import tqdm

import srdiff  # srdiff: processors, noise and loss, the refinement cycle
from srdiff.diffusion.seeding import image_generators, key  # srdiff: keyed draws

logger = get_logger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Unconditional diffusion training with self-refinement.")
    parser.add_argument("--train_data_dir", required=True, help="a folder of images (searched recursively)")
    parser.add_argument("--model_config_name_or_path", default=None,
                        help="a UNet2DModel config (folder or config.json); default: diffusers' example UNet")
    parser.add_argument("--output_dir", default="ddpm-model")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--center_crop", action="store_true", help="center-crop instead of random-crop")
    parser.add_argument("--random_flip", action="store_true", help="random horizontal flips")
    parser.add_argument("--train_batch_size", type=int, default=16, help="per process")
    parser.add_argument("--max_train_steps", type=int, default=2000)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--lr_scheduler", default="cosine")
    parser.add_argument("--lr_warmup_steps", type=int, default=500)
    parser.add_argument("--adam_beta1", type=float, default=0.95)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-6)
    parser.add_argument("--adam_epsilon", type=float, default=1e-8)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--use_ema", action="store_true", help="keep an EMA of the weights (refresh samples use it)")
    parser.add_argument("--ema_inv_gamma", type=float, default=1.0)
    parser.add_argument("--ema_power", type=float, default=3 / 4)
    parser.add_argument("--ema_max_decay", type=float, default=0.9999)
    parser.add_argument("--ddpm_num_steps", type=int, default=1000)
    parser.add_argument("--ddpm_beta_schedule", default="linear")
    parser.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction", "sample"])
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                        help="bf16 on a GPU; the CPU trains in fp32")
    parser.add_argument("--checkpointing_steps", type=int, default=500, help="accelerator.save_state every N steps")
    parser.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-N folder, or 'latest'")
    parser.add_argument("--report_to", default=None, help="an accelerate tracker (tensorboard, wandb, ...)")
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    refine = parser.add_argument_group("self-refinement (srdiff)")
    refine.add_argument("--refine_start", type=int, default=None, help="base steps (default: half of max_train_steps)")
    refine.add_argument("--refine_cycle", type=int, default=100, help="steps between mFAM refreshes")
    refine.add_argument("--lam_f", type=float, default=0.01, help="forward noise amplification")
    refine.add_argument("--lam_r", type=float, default=0.025, help="attention K/V modulation")
    refine.add_argument("--mfam_samples", type=int, default=64, help="samples per refresh, over all processes")
    refine.add_argument("--refine_sampler_steps", type=int, default=20, help="DDIM steps of the refresh samples")
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


class ImageFolder(torch.utils.data.Dataset):
    def __init__(self, root, transform):
        self.paths = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise ValueError(f"--train_data_dir {root!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.transform = transform
        self.mode = "L" if Image.open(self.paths[0]).mode in ("L", "I", "I;16", "1") else "RGB"

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return {"input": self.transform(Image.open(self.paths[i]).convert(self.mode))}


def main(args):
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    set_seed(args.seed)

    augmentations = transforms.Compose([
        transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(args.resolution) if args.center_crop else transforms.RandomCrop(args.resolution),
        transforms.RandomHorizontalFlip() if args.random_flip else transforms.Lambda(lambda x: x),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])
    dataset = ImageFolder(args.train_data_dir, augmentations)
    train_dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=True, num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed))
    channels = 3 if dataset.mode == "RGB" else 1

    if args.model_config_name_or_path is None:
        model = UNet2DModel(
            sample_size=args.resolution, in_channels=channels, out_channels=channels, layers_per_block=2,
            block_out_channels=(128, 128, 256, 256, 512, 512),
            down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        )
    else:
        model = UNet2DModel.from_config(UNet2DModel.load_config(args.model_config_name_or_path))
    srdiff.set_fam_attn_processor(model, lam=args.lam_r)  # srdiff: FAM processors on every self-attention layer
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True,
                             inv_gamma=args.ema_inv_gamma, power=args.ema_power, model_cls=UNet2DModel,
                             model_config=model.config)
    noise_scheduler = DDPMScheduler(num_train_timesteps=args.ddpm_num_steps, beta_schedule=args.ddpm_beta_schedule,
                                    prediction_type=args.prediction_type)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(accelerator.device)  # srdiff: the noise ops' schedule

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    # The prepared scheduler steps once per process and optimiser step (diffusers' convention).
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(model, optimizer, train_dataloader,
                                                                           lr_scheduler)
    if ema_model is not None:
        ema_model.to(accelerator.device)
        accelerator.register_for_checkpointing(ema_model)

    # srdiff: the refinement cycle. Its sampler draws this process's share of a refresh's images from the EMA
    # weights; image i starts from its own generator (seed, i), so the ranks draw different images.
    plain = transforms.Compose(augmentations.transforms[:2] + [transforms.ToTensor()])
    real = ImageFolder(args.train_data_dir, plain)
    real_images = torch.stack([real[i]["input"] for i in range(min(len(real), args.highlighter_real_images))])

    @torch.no_grad()
    def sample(n, seed, first_index):
        unet = accelerator.unwrap_model(model)
        if ema_model is not None:
            ema_model.store(unet.parameters())
            ema_model.copy_to(unet.parameters())
        pipeline = DDIMPipeline(unet=unet, scheduler=noise_scheduler)
        pipeline.set_progress_bar_config(disable=True)
        with accelerator.autocast():
            images = pipeline(batch_size=n, generator=image_generators(seed, first_index, n), output_type="np",
                              num_inference_steps=args.refine_sampler_steps).images
        if ema_model is not None:
            ema_model.restore(unet.parameters())
        return torch.from_numpy(images).permute(0, 3, 1, 2).float().clamp(0, 1).to(accelerator.device)

    refiner = srdiff.Refiner(  # srdiff
        args.highlighter or srdiff.HighlighterRecipe(epochs=args.highlighter_epochs, samples=args.highlighter_samples),
        real_images.to(accelerator.device), sample, base_steps=args.refine_start, cycle=args.refine_cycle,
        mfam_samples=args.mfam_samples, finetune_steps=args.highlighter_finetune_steps, seed=args.seed,
        require_fam=args.require_fam, figures=output_dir / "refinement")
    accelerator.register_for_checkpointing(refiner)  # srdiff: the mFAM and the highlighter in every checkpoint

    if accelerator.is_main_process:
        accelerator.init_trackers("train_unconditional", config=vars(args))
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

    logger.info(f"{len(dataset)} images, {args.max_train_steps} steps of {args.train_batch_size} x "
                f"{accelerator.num_processes} processes x {args.gradient_accumulation_steps} accumulated")
    progress = tqdm(range(args.max_train_steps), initial=global_step, disable=not accelerator.is_local_main_process)
    micro_batches, losses, train_loss = global_step * args.gradient_accumulation_steps, [], 0.0
    for epoch in range(first_epoch, math.ceil(args.max_train_steps / steps_per_epoch)):
        model.train()
        loader = accelerator.skip_first_batches(train_dataloader, skip) if epoch == first_epoch else train_dataloader
        for batch in loader:
            clean_images = batch["input"]
            # srdiff: the keys of this micro-batch's draws (its index in the global order of micro-batches)
            micro = micro_batches * accelerator.num_processes + accelerator.process_index
            micro_batches += 1
            timesteps = torch.randint(0, args.ddpm_num_steps, (len(clean_images),),
                                      generator=torch.Generator().manual_seed(key(args.seed, micro))).to(clean_images.device)
            mfam = refiner.step(global_step)  # srdiff: None in the base phase, refreshed every cycle
            noisy_images, _ = srdiff.amplified_add_noise(  # srdiff: noise (eps + lam_f * mFAM), keyed
                clean_images, timesteps, alphas_cumprod, fam=mfam, lam=args.lam_f, seed=key(args.seed, micro, 1),
                prediction_type=args.prediction_type, return_target=False)

            with accelerator.accumulate(model):
                with srdiff.fam_context(mfam):  # srdiff: K and V scaled by 1 + lam_r * mFAM
                    model_output = model(noisy_images, timesteps).sample
                loss = srdiff.amplified_noise_loss(  # srdiff: the loss against the amplified target
                    model_output, clean_images, timesteps, alphas_cumprod, mfam, args.lam_f,
                    seed=key(args.seed, micro, 1), prediction_type=args.prediction_type)
                train_loss += accelerator.gather(loss.detach()[None]).mean().item() / args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                if ema_model is not None:
                    ema_model.step(model.parameters())
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
        unet = accelerator.unwrap_model(model)
        if ema_model is not None:
            ema_model.copy_to(unet.parameters())
        srdiff.remove_fam_attn_processor(unet)  # srdiff: the saved pipeline samples with plain attention
        DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(output_dir)
        if refiner.highlighter is not None:
            refiner.highlighter.save(output_dir / "highlighter.pt")  # srdiff
    accelerator.end_training()
    return {"losses": losses, "refiner": refiner}


if __name__ == "__main__":
    main(parse_args())
