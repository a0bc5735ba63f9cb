"""``srdiff repair``: find flaws in images with a highlighter and re-denoise only there with a trained model."""

import argparse
import json
from pathlib import Path

from srdiff.trainer.cli import guidance_scale_arg

OUTPUTS = ("before.png", "after.png", "masks.png", "contact-sheet.png", "report.json", "repaired.pt", "masks.pt")


def add_commands(sub) -> None:
    p = sub.add_parser("repair", help="repair the flaws a highlighter finds, re-denoising only there (training-free)",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="trainer checkpoint (checkpoints/last.pt) of any task and backbone: its EMA "
                                       "model, task, config and VAE")
    source.add_argument("--pipeline", help="a saved diffusers pipeline folder (DDPMPipeline, DDIMPipeline, LDMPipeline)")
    p.add_argument("--highlighter", required=True, help="checkpoint from 'srdiff highlighter train' (or a trainer run's highlighter.pt)")
    p.add_argument("--images", required=True,
                   help="'digits', an image folder, an image file or a tensor file (N, C, H, W) in [0, 1] "
                        "(e.g. from 'srdiff sample --tensor-out')")
    p.add_argument("--out", required=True, help="output folder: " + ", ".join(OUTPUTS))
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--class", dest="class_labels", type=int, nargs="+", metavar="K",
                        help="class-conditional models (needed by them): the class of each image, cycled over "
                             "the images")
    labels.add_argument("--class-labels", dest="class_labels_file", metavar="FILE",
                        help="class-conditional models: a tensor file of (N,) class labels, one per image")
    p.add_argument("--prompt", nargs="+", metavar="TEXT",
                   help="--ckpt of a text-to-image run (needed by it): the prompt of each image, cycled over the "
                        "images")
    p.add_argument("--guidance-scale", type=guidance_scale_arg,
                   help="--ckpt of a class or text run: classifier-free guidance scale, finite and >= 0 "
                        "(default: the run's)")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"), help="--ckpt only: the scheduler")
    p.add_argument("--strength", type=float, default=0.5, help="how far the flagged regions are noised, in (0, 1]")
    p.add_argument("--steps", type=int, default=50, help="scheduler steps over the whole schedule (strength x steps run)")
    p.add_argument("--threshold", type=float, default=0.5, help="mask = FAM >= threshold (see --threshold-mode)")
    p.add_argument("--threshold-mode", default="relative", choices=("relative", "absolute"),
                   help="relative: to each image's own map maximum; absolute: the FAM value")
    p.add_argument("--dilate", type=int, default=1, help="grow the mask by this many pixels")
    p.add_argument("--feather", type=int, default=1, help="soft mask edge, pixels")
    p.add_argument("--rounds", type=int, default=1, help="repeat on images still flagged, up to this many rounds")
    p.add_argument("--flag-threshold", type=float, default=0.5, help="an image is flagged when P(fake) >= this")
    p.add_argument("--all", dest="only_flagged", action="store_false",
                   help="repair every image with a non-empty mask, flagged or not")
    p.add_argument("--resample", type=int, default=1, help="RePaint resampling count (1: none)")
    p.add_argument("--jump", type=int, default=1, help="RePaint jump length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--scale", type=int, default=4, help="upscaling of the PNG sheets (nearest)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    p.set_defaults(func=_repair)


def _load_source(args, device):
    """(the trained model of --ckpt or the pipeline of --pipeline, image size, channels)."""
    if args.ckpt:
        from srdiff.trainer.trained import load_trained

        trained = load_trained(args.ckpt, device)
        return trained, trained.config.image_size, trained.config.channels
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.pipeline).to(device)
    vae = getattr(pipe, "vqvae", None) or getattr(pipe, "vae", None)
    size = pipe.unet.config.sample_size * (2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1)
    channels = vae.config.in_channels if vae is not None else pipe.unet.config.in_channels
    return pipe, size, channels


def _model_kwargs(args, source, n: int) -> dict:
    """``repair_flaws``' model keywords for ``n`` images: --ckpt's
    :class:`~srdiff.diffusion.denoiser.Denoiser` (its task's own denoiser call with the images' conditions),
    or --pipeline's UNet, scheduler and VAE."""
    import torch

    from srdiff._io import load_file
    from srdiff.trainer.cli import CONDITION_FLAGS, condition_kwargs

    conditions = condition_kwargs(args, n)
    flags = dict(CONDITION_FLAGS)
    if args.class_labels_file:
        conditions["class_labels"] = load_file(args.class_labels_file, "a tensor file of (N,) class labels")
        flags["class_labels"] = "--class-labels"
    if args.ckpt:
        return {"model": source.denoiser(**conditions, guidance_scale=args.guidance_scale,
                                         sampler=args.sampler, names=flags)}
    labels = conditions.get("class_labels")
    return {"model": source.unet, "scheduler": source.scheduler, "vae": getattr(source, "vqvae", None) or
            getattr(source, "vae", None), "class_labels": None if labels is None else torch.as_tensor(labels)}


def contact_sheet(before, masks, after):
    """(3N, 3, H, W): per image, the input, its mask (N, 1, H, W) over it (jet), the repair: one row of three."""
    import torch

    from srdiff.viz import overlay

    rgb = lambda x: x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # noqa: E731
    return torch.stack([rgb(before), overlay(before, masks[:, 0]), rgb(after)], dim=1).flatten(0, 1)


def _repair(args) -> None:
    import torch

    from srdiff._device import resolve_device
    from srdiff.data import read_images
    from srdiff.highlighter import FlawHighlighter
    from srdiff.repair import repair_flaws
    from srdiff.run_dir import refuse_existing
    from srdiff.viz import save_grid

    out = Path(args.out)
    refuse_existing([out / name for name in OUTPUTS], overwrite=args.overwrite)
    for flag, value in (("--prompt", args.prompt), ("--guidance-scale", args.guidance_scale)):
        if args.pipeline and value is not None:
            raise ValueError(f"{flag} needs --ckpt (a trainer checkpoint: its task encodes prompts and guides); "
                             f"the UNet of --pipeline {args.pipeline} is called with class labels at most")
    device = resolve_device(args.device)
    source, size, channels = _load_source(args, device)
    highlighter = FlawHighlighter.load(args.highlighter, map_location=device)
    images, names = read_images(args.images, size, channels)
    repaired, masks, report = repair_flaws(
        images, highlighter=highlighter, **_model_kwargs(args, source, len(images)), strength=args.strength,
        steps=args.steps, threshold=args.threshold, threshold_mode=args.threshold_mode, dilate=args.dilate,
        feather=args.feather, rounds=args.rounds, flag_threshold=args.flag_threshold, only_flagged=args.only_flagged,
        resample=args.resample, jump=args.jump, seed=args.seed, batch_size=args.batch_size, progress=args.progress)
    for record, name in zip(report["images"], names):
        record["name"] = name
    report["source"] = {"ckpt": args.ckpt, "pipeline": args.pipeline, "highlighter": args.highlighter,
                        "images": args.images, "class": args.class_labels,
                        "class_labels": args.class_labels_file, "prompt": args.prompt,
                        "guidance_scale": args.guidance_scale}
    out.mkdir(parents=True, exist_ok=True)
    save_grid(images, out / "before.png", upscale=args.scale)
    save_grid(repaired, out / "after.png", upscale=args.scale)
    save_grid(masks.expand(-1, 3, -1, -1), out / "masks.png", upscale=args.scale)
    save_grid(contact_sheet(images, masks, repaired), out / "contact-sheet.png", nrow=3, upscale=args.scale)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    torch.save(repaired, out / "repaired.pt")
    torch.save(masks, out / "masks.pt")
    s = report["summary"]
    flagged = (f", flagged {s['flagged_before']:.1%} -> {s['flagged_after']:.1%}" if "flagged_before" in s else "")
    print(f"repaired {s['repaired']} of {s['images']} images{flagged}; mean mask area {s['mean_mask_area']:.1%}; "
          f"outputs in {out}")
