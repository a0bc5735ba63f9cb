"""``srdiff train | sample | export | inpaint | eval | ablate | demo``."""

import argparse
import json
import sys
import time
from pathlib import Path

from srdiff.trainer import ablation
from srdiff.trainer.config import TrainConfig, add_config_flags, config_overrides

EXIT_DIVERGED = 1  # the loss became NaN or inf (srdiff.cli.main: 2 for user errors, 130 for Ctrl-C)
#: the flags of a loaded model's condition arguments (srdiff.trainer.trained.ARGUMENTS), named in its errors
CONDITION_FLAGS = {"class_labels": "--class", "prompts": "--prompt", "guidance_scale": "--guidance-scale"}


def _train(args) -> int:
    summary, is_main = _run_training(_config(args), args)
    if summary is None:
        return EXIT_DIVERGED
    if is_main:
        _print_summary(summary)
    return 0


def _config(args) -> TrainConfig:
    """The run's config: ``--config FILE`` and the flags over the defaults; with ``--resume`` of a run that has
    a checkpoint, over that run's stored config instead (:mod:`srdiff.trainer.resume`), each change printed."""
    from srdiff.run_dir import is_main_process, prepare_out_dir
    from srdiff.trainer.resume import resumed_config, stored_config

    overrides = config_overrides(args)
    if not args.resume:
        return TrainConfig(**overrides)
    out_dir = overrides.get("out_dir", TrainConfig.__dataclass_fields__["out_dir"].default)
    prepare_out_dir(out_dir, resume=True, overwrite=args.overwrite)  # in use by another run? (reads only)
    stored = stored_config(out_dir)
    if stored is None:
        if is_main_process():
            print(f"{args._prog}: no checkpoint in {out_dir} to resume: starting a new run there")
        return TrainConfig(**overrides)
    config, changes = resumed_config(stored, {**overrides, "out_dir": out_dir})
    if is_main_process():
        print(f"{args._prog}: resuming the run in {out_dir} with its stored config"
              + (", changed by the flags given:" if changes else " (no flag changes it)"))
        for change in changes:
            print(f"  {change}")
    return config


def _run_training(config, args) -> tuple[dict | None, bool]:
    """Check the out dir (``--resume`` / ``--overwrite``), build the trainer (which loads and checks the data
    before anything is written) and train; returns the summary (None if the loss diverged, which it says on
    stderr) and whether this is rank 0. After Ctrl-C the ``KeyboardInterrupt`` says where the last
    checkpoint is."""
    from srdiff.trainer import distributed
    from srdiff.run_dir import prepare_out_dir
    from srdiff.trainer.trainer import NonFiniteLossError, SelfRefiningTrainer

    prepare_out_dir(config.out_dir, resume=args.resume, overwrite=args.overwrite)
    trainer = None
    try:
        trainer = SelfRefiningTrainer(config)
        return trainer.train(resume=args.resume), trainer.dist.is_main
    except NonFiniteLossError as exc:
        print(f"{args._prog}: {exc}", file=sys.stderr)
        return None, trainer.dist.is_main
    except KeyboardInterrupt:
        checkpoint = trainer.last_checkpoint if trainer is not None else None
        raise KeyboardInterrupt(f"at step {trainer.step}, checkpoint {checkpoint}: run the same command with --resume "
                                "to continue" if checkpoint else "no checkpoint was written") from None
    finally:
        distributed.shutdown()


def _print_summary(summary: dict) -> None:
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"  {key:<{width}}  {value}")


def _sample(args) -> int:
    from srdiff.trainer.trained import load_trained

    outputs = _sample_outputs(args)
    trained = load_trained(args.ckpt, args.device)
    images = trained.sample(args.n, **_sampling_kwargs(args, args.n))
    _write_samples(images, args, outputs)
    if args.export:
        print(f"exported the EMA denoiser (task {trained.config.task!r}) to {trained.export(args.export)}")
    return 0


def _export(args) -> int:
    from srdiff.run_dir import refuse_existing
    from srdiff.trainer.trained import load_trained

    out = Path(args.out)
    refuse_existing([out] if out.is_file() or (out.is_dir() and any(out.iterdir())) else [], overwrite=args.overwrite)
    trained = load_trained(args.ckpt, args.device)
    print(f"exported the EMA denoiser (task {trained.config.task!r}) of {args.ckpt} to {trained.export(out)}")
    return 0


def _sample_outputs(args) -> dict:
    """Where ``srdiff sample`` writes (checked before sampling): the grid, the PNG folder and one name per
    image in it (None with --no-pngs), the tensor file. Existing files are refused unless --overwrite."""
    from srdiff import viz
    from srdiff.run_dir import refuse_existing

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.upscale < 1:
        raise ValueError(f"--upscale must be >= 1, got {args.upscale}")
    grid = Path(args.out)
    if grid.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {args.out!r}")
    png_dir = None if args.no_pngs else Path(args.png_dir) if args.png_dir else grid.with_suffix("")
    names = viz.numbered_names(args.n, ".png") if png_dir is not None else []
    tensor = Path(args.tensor_out) if args.tensor_out else None
    planned = [grid, *(png_dir / name for name in names), *([tensor] if tensor else [])]
    if args.export:
        planned.append(Path(args.export) / "model_index.json")
    refuse_existing(planned, overwrite=args.overwrite)
    return {"grid": grid, "png_dir": png_dir, "names": names, "tensor": tensor}


def _write_samples(images, args, outputs: dict) -> None:
    import torch

    from srdiff import viz

    viz.save_grid(images, outputs["grid"], upscale=args.upscale)
    print(f"wrote a grid of {len(images)} samples to {outputs['grid']}")
    if outputs["png_dir"] is not None:
        for name, image in zip(outputs["names"], images):
            viz.save_png(image, outputs["png_dir"] / name)
        print(f"wrote each sample at {images.shape[-1]}x{images.shape[-2]} px to {outputs['png_dir']}/")
    if outputs["tensor"] is not None:
        torch.save(images, outputs["tensor"])
        print(f"wrote the (N, C, H, W) tensor in [0, 1] to {outputs['tensor']}")


def _sampling_kwargs(args, n: int) -> dict:
    """The sampler's keywords for ``n`` images from ``--steps --sampler --seed [--class] [--prompt]
    [--guidance-scale]`` (checked by :meth:`~srdiff.trainer.trained.TrainedModel.sample`, its errors naming
    the flags)."""
    return dict(steps=args.steps, sampler=args.sampler, seed=args.seed, progress=True,
                guidance_scale=args.guidance_scale, names=CONDITION_FLAGS, **condition_kwargs(args, n))


def condition_kwargs(args, n: int) -> dict:
    """``class_labels`` / ``prompts`` for ``n`` images from ``--class`` / ``--prompt`` (each cycled over the
    images, as given), where given."""
    def cycled(values):
        return [values[i % len(values)] for i in range(n)]

    kwargs = {}
    if getattr(args, "class_labels", None) is not None:
        kwargs["class_labels"] = cycled(args.class_labels)
    if getattr(args, "prompt", None) is not None:
        kwargs["prompts"] = cycled(args.prompt)
    return kwargs


def _inpaint(args) -> int:
    from srdiff import data as srdata
    from srdiff.diffusion.masks import check_masks, read_masks
    from srdiff.trainer.trained import load_trained

    trained = load_trained(args.ckpt, args.device)
    images, _ = srdata.read_images(args.images, trained.config.image_size, trained.config.channels)
    masks = check_masks(read_masks(args.masks), images, name="--masks")
    args.n, args.export = len(images), None
    outputs = _sample_outputs(args)
    filled = trained.inpaint(images, masks, steps=args.steps, jump=args.jump_length, resample=args.resamplings,
                             seed=args.seed, sampler=args.sampler, progress=True)
    _write_samples(filled, args, outputs)
    return 0


def _eval(args) -> int:
    import torch

    from srdiff.trainer.dataset import load_dataset
    from srdiff.trainer.metrics import evaluate_generator
    from srdiff.run_dir import refuse_existing
    from srdiff.trainer.trained import load_trained

    refuse_existing([args.out] if args.out else [], overwrite=args.overwrite)
    trained = load_trained(args.ckpt, args.device)
    data = load_dataset(trained.config, torch.device(args.device))
    trained.task.data = data  # what a task draws its sampling inputs from (inpainting: images to fill)
    config = trained.config.replace(features=args.features or trained.config.features, device=args.device)
    result = evaluate_generator(
        config, lambda n: trained.sample(n, **_sampling_kwargs(args, n)),
        args.n, data.train_images, data.train_labels, data.holdout_images, data.holdout_labels,
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


def _ablate(args) -> int:
    from srdiff.trainer.ablation import command

    print(command(args))
    return 0


def _demo(args) -> int:
    from srdiff.trainer.metrics import describe_features

    started = time.monotonic()
    config = _config(args)
    print(f"srdiff demo: {config.data} at {config.image_size}x{config.image_size}, mode {config.mode}, "
          f"{config.base_steps} base + {config.steps - config.base_steps} refinement steps, outputs in {config.out_dir}/")
    summary, _ = _run_training(config, args)
    if summary is None:
        return EXIT_DIVERGED
    out = Path(config.out_dir)
    print("\nsrdiff demo: done. Where things are:")
    _print_summary({
        "samples (EMA, final)": summary["samples"],
        "FAM overlays per cycle": f"{out / 'figures'}/cycle_*_fam.png",
        "mFAM per cycle": f"{out / 'figures'}/cycle_*_mfam.png",
        "refresh samples per cycle": f"{out / 'figures'}/cycle_*_samples.png",
        "loss plot": summary["loss_plot"],
        "metrics (JSONL)": summary["metrics"],
        "checkpoint": summary["checkpoint"],
        "highlighter": summary.get("highlighter", "-"),
        "diffusers pipeline": summary["pipeline"],
        "evaluation": summary.get("eval", "-"),
    })
    if "eval" in summary:
        result = json.loads(Path(summary["eval"]).read_text())
        net = result["feature_net"]
        print(f"\nFID {result['fid']:.3f}  KID {result['kid_mean']:.5f} ± {result['kid_std']:.5f}  "
              f"precision {result['precision']:.3f}  recall {result['recall']:.3f}  "
              f"({result['n_fake']} samples vs {result['n_real']} held-out images; {describe_features(net)})")
    minutes, seconds = divmod(round(time.monotonic() - started), 60)
    print(f"srdiff demo: {minutes} min {seconds:02d} s (training, sampling, evaluation)")
    return 0


def _common_sampling(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--ckpt", required=True, help="a trainer checkpoint (checkpoints/last.pt)")
    p.add_argument("--n", type=int, default=64, help="how many images")
    p.add_argument("--steps", type=int, default=steps, help="sampler steps")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--guidance-scale", type=guidance_scale_arg,
                   help="classifier-free guidance scale, finite and >= 0 (default: the run's)")


def guidance_scale_arg(text: str) -> float:
    """``--guidance-scale``: refused by argparse (exit 2) unless finite and >= 0, before a checkpoint loads."""
    from srdiff._checks import check_guidance_scale

    try:
        return check_guidance_scale(float(text), "the scale")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT_DIR from its checkpoints/last.pt with its stored config.json (flags "
                        "given change it, each change printed; --steps may grow: the added steps refine); an OUT_DIR "
                        "without a checkpoint starts afresh")
    p.add_argument("--overwrite", action="store_true",
                   help="move a non-empty OUT_DIR aside to OUT_DIR.old-<timestamp> and start afresh (nothing is "
                        "deleted); without --resume or --overwrite a non-empty OUT_DIR is refused")


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="self-refining diffusion training (torchrun for DDP)",
                       description="Train with --config FILE (TOML, YAML, or a run's config.json) and/or flags; "
                                   "flags win. With --resume, the run's stored config takes the defaults' place.")
    p.add_argument("--config", help="TOML, YAML or JSON config file (a run's config.json too)")
    _run_flags(p)
    add_config_flags(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("sample", help="samples of a checkpoint: grid, one PNG each, tensor, pipeline")
    _common_sampling(p, 50)
    p.add_argument("--out", default="samples.png", help="grid PNG")
    p.add_argument("--upscale", type=int, default=4, help="nearest-neighbour upscaling of the grid")
    p.add_argument("--png-dir", help="folder for one PNG per image, at the model's resolution (default: the grid's "
                                     "name without .png, beside it: samples.png -> samples/0000.png, ...)")
    p.add_argument("--no-pngs", action="store_true", help="write the grid only, no PNG per image")
    p.add_argument("--tensor-out", help="also save the images as a (N, C, H, W) tensor file")
    p.add_argument("--overwrite", action="store_true", help="replace output files that exist (refused otherwise)")
    p.add_argument("--class", dest="class_labels", type=int, nargs="+",
                   help="class-conditional checkpoints: the classes to sample (cycled over --n)")
    p.add_argument("--prompt", nargs="+", help="text-to-image checkpoints: the captions to sample (cycled over --n)")
    p.add_argument("--export", help="directory for the task's diffusers pipeline (save_pretrained)")
    p.set_defaults(func=_sample)

    p = sub.add_parser("export", help="a checkpoint's EMA denoiser as its task's diffusers pipeline (save_pretrained)",
                       description="Plain and sharded (parallel 'fsdp') checkpoints alike: a sharded one is gathered "
                                   "from its shards in this one process.")
    p.add_argument("--ckpt", required=True, help="a trainer checkpoint (checkpoints/last.pt)")
    p.add_argument("--out", required=True, help="the pipeline's folder (refused if it holds anything, unless --overwrite)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that holds files")
    p.set_defaults(func=_export)

    p = sub.add_parser("inpaint", help="fill holes: RePaint with an unconditional checkpoint, or an 'inpaint' one",
                       description="Images are resized to the model's resolution; masks (white/1 = hole, "
                                   "binarised at 0.5) must be at that resolution already.")
    p.add_argument("--ckpt", required=True, help="a trainer checkpoint (checkpoints/last.pt)")
    p.add_argument("--images", required=True, help="a folder of images, an image file or a tensor file")
    p.add_argument("--masks", required=True, help="one mask per image (or one for all): a folder, image or tensor file")
    p.add_argument("--out", default="inpainted.png", help="grid PNG")
    p.add_argument("--steps", type=int, default=250, help="reverse steps (RePaint: before jumps)")
    p.add_argument("--jump-length", type=int, default=10, help="RePaint: steps between jumps back")
    p.add_argument("--resamplings", type=int, default=10, help="RePaint: resamplings per jump")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddpm", help="'inpaint' checkpoints: the sampler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--upscale", type=int, default=4, help="nearest-neighbour upscaling of the grid")
    p.add_argument("--png-dir", help="folder for one PNG per image (default: the grid's name without .png)")
    p.add_argument("--no-pngs", action="store_true", help="write the grid only, no PNG per image")
    p.add_argument("--tensor-out", help="also save the images as a (N, C, H, W) tensor file")
    p.add_argument("--overwrite", action="store_true", help="replace output files that exist (refused otherwise)")
    p.set_defaults(func=_inpaint)

    p = sub.add_parser("eval", help="FID, KID, precision/recall of a checkpoint vs held-out data")
    _common_sampling(p, 50)
    p.set_defaults(n=1000)
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (refused otherwise)")
    p.add_argument("--features", choices=("inception", "local"),
                   help="feature network (default: the checkpoint config's, normally 'inception')")
    p.set_defaults(func=_eval)

    p = sub.add_parser("ablate", help="modes x seeds, recipes, and the lam_f/lam_r/ratio/cycle sweeps, with paired CIs")
    ablation.add_arguments(p)
    add_config_flags(p)
    p.set_defaults(func=_ablate)

    p = sub.add_parser("demo", help="the digits demo: train, refine, sample, evaluate (CPU, minutes)")
    p.add_argument("--config", default="configs/demo.toml", help="demo config")
    _run_flags(p)
    add_config_flags(p)
    p.set_defaults(func=_demo)
