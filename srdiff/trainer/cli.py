"""``srdiff train | sample | eval | ablate | demo``."""

import argparse
import json
import sys
from pathlib import Path

from srdiff.trainer.ablation import LAMBDAS
from srdiff.trainer.config import add_config_flags, config_from_args


class _ConfigError(Exception):
    pass


def _config(args):
    """The config from --config and the flags; a bad file or value ends the command with its message."""
    try:
        return config_from_args(args)
    except ValueError as exc:
        raise _ConfigError(f"srdiff {args.command}: error: {exc}") from None


def _train(args) -> int:
    from srdiff.trainer import distributed
    from srdiff.trainer.trainer import NonFiniteLossError, SelfRefiningTrainer

    config = _config(args)
    trainer = SelfRefiningTrainer(config)
    try:
        summary = trainer.train(resume=args.resume)
    except NonFiniteLossError as exc:
        print(f"srdiff train: {exc}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    if trainer.dist.is_main:
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"  {key:<{width}}  {value}")


def _sample(args) -> int:
    import torch

    from srdiff import viz
    from srdiff.trainer.sampling import export_pipeline, load_ema_unet, sample

    unet, config, vae = load_ema_unet(args.ckpt, args.device)
    images = sample(unet, config, args.n, steps=args.steps, sampler=args.sampler, seed=args.seed, vae=vae,
                    progress=True)
    viz.save_grid(images, args.out, upscale=args.upscale)
    print(f"wrote {args.n} samples to {args.out}")
    if args.tensor_out:
        torch.save(images, args.tensor_out)
        print(f"wrote the (N, C, H, W) tensor in [0, 1] to {args.tensor_out}")
    if args.export:
        print(f"exported the EMA UNet as a diffusers pipeline to {export_pipeline(unet, config, args.export, vae)}")
    return 0


def _eval(args) -> int:
    from srdiff.trainer.dataset import load_dataset
    from srdiff.trainer.metrics import evaluate_generator
    from srdiff.trainer.sampling import load_ema_unet, sample

    unet, config, vae = load_ema_unet(args.ckpt, args.device)
    data = load_dataset(config, unet.device)
    result = evaluate_generator(
        config, lambda n: sample(unet, config, n, steps=args.steps, sampler=args.sampler, seed=args.seed, vae=vae,
                                 progress=True),
        args.n, data.train_images, data.train_labels, data.holdout_images, data.holdout_labels,
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


def _ablate(args) -> int:
    from srdiff.trainer.ablation import run_ablation

    config = _config(args)
    result = run_ablation(config, seeds=args.seeds, modes=args.modes, out=args.out, sweep=args.sweep,
                          lambdas=args.sweep_lambdas, cycles=args.sweep_cycles)
    print(result["table"])
    return 0


def _demo(args) -> int:
    from srdiff.trainer import distributed
    from srdiff.trainer.trainer import SelfRefiningTrainer

    config = _config(args)
    print(f"srdiff demo: {config.data} at {config.image_size}x{config.image_size}, mode {config.mode}, "
          f"{config.base_steps} base + {config.steps - config.base_steps} refinement steps, outputs in {config.out_dir}/")
    try:
        summary = SelfRefiningTrainer(config).train()
    finally:
        distributed.shutdown()
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
              f"({result['n_fake']} samples vs {result['n_real']} held-out images; features: the locally trained "
              f"{'class' if net['task'] == 'classes' else net['task']} classifier, held-out accuracy "
              f"{net['accuracy']:.3f})")
    return 0


def _common_sampling(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--ckpt", required=True, help="a trainer checkpoint (checkpoints/last.pt)")
    p.add_argument("--n", type=int, default=64, help="how many images")
    p.add_argument("--steps", type=int, default=steps, help="sampler steps")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")


def _guarded(func):
    def run(args) -> int:
        try:
            return func(args)
        except _ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2

    return run


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="self-refining diffusion training (torchrun for DDP)",
                       description="Train with --config FILE (TOML/YAML) and/or flags; flags win.")
    p.add_argument("--config", help="TOML or YAML config file")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoints/last.pt if present")
    add_config_flags(p)
    p.set_defaults(func=_guarded(_train))

    p = sub.add_parser("sample", help="sample a grid from a checkpoint's EMA model; export for diffusers")
    _common_sampling(p, 50)
    p.add_argument("--out", default="samples.png", help="grid PNG")
    p.add_argument("--upscale", type=int, default=4, help="nearest-neighbour upscaling of the grid")
    p.add_argument("--tensor-out", help="also save the images as a (N, C, H, W) tensor file")
    p.add_argument("--export", help="directory for a diffusers DDPMPipeline (save_pretrained)")
    p.set_defaults(func=_sample)

    p = sub.add_parser("eval", help="FID, KID and k-NN precision/recall of a checkpoint against held-out data")
    _common_sampling(p, 50)
    p.set_defaults(n=1000)
    p.add_argument("--out", help="write the result JSON here")
    p.set_defaults(func=_eval)

    p = sub.add_parser("ablate", help="baseline/forward/reverse/combined x seeds, plus the lambda/cycle sweep")
    p.add_argument("--config", help="TOML or YAML config (the shared settings of every run)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--modes", nargs="+", default=["baseline", "forward", "reverse", "combined"],
                   choices=("baseline", "forward", "reverse", "combined"))
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the lambda and cycle sweep (combined mode, first seed)")
    p.add_argument("--sweep-lambdas", type=float, nargs="+", default=list(LAMBDAS),
                   help="lambda values of the sweep (lam_f = lam_r)")
    p.add_argument("--sweep-cycles", type=int, nargs="+",
                   help="cycle values of the sweep (default: 50/100/500 scaled to the refinement steps)")
    p.add_argument("--out", default="docs/figures/ablation", help="where the JSON and PNGs go")
    add_config_flags(p)
    p.set_defaults(func=_guarded(_ablate))

    p = sub.add_parser("demo", help="the digits demo: train, refine, sample, evaluate (CPU, minutes)")
    p.add_argument("--config", default="configs/demo.toml", help="demo config")
    add_config_flags(p)
    p.set_defaults(func=_guarded(_demo))
