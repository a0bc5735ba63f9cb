"""``srdiff highlighter train``, ``srdiff highlighter eval-planted`` and ``srdiff fam``."""

import argparse
import json
from pathlib import Path

PLANTED_PREFIX = "planted:"


def add_commands(sub) -> None:
    hl = sub.add_parser("highlighter", help="train and check the flaw highlighter")
    hl_sub = hl.add_subparsers(dest="highlighter_command", required=True, metavar="COMMAND")

    train = hl_sub.add_parser("train", help="train a real/fake flaw highlighter, write a checkpoint")
    train.add_argument("--real", required=True, help="'digits', an image folder or a tensor file (N, C, H, W) in [0, 1]")
    train.add_argument("--fake", required=True,
                       help=f"an image folder, a samples tensor file, or '{PLANTED_PREFIX}KIND': the real images "
                            "with a planted artifact (see eval-planted)")
    train.add_argument("--out", required=True, help="checkpoint path (written atomically)")
    train.add_argument("--weights", help="a local torchvision state dict for the backbone (nothing is downloaded)")
    train.add_argument("--history", help="also write the per-epoch metrics as JSON here")
    train.add_argument("--overwrite", action="store_true", help="replace --out / --history if they exist (refused "
                                                                "otherwise)")
    _model_args(train)
    _fit_args(train)
    train.set_defaults(func=_train)

    ev = hl_sub.add_parser("eval-planted", help="the planted-artifact localisation benchmark on digits")
    ev.add_argument("--kinds", nargs="+", default=None,
                    help="artifact kinds (default: all), or 'all' for one highlighter trained on every kind")
    ev.add_argument("--severity", nargs="*", default=[], metavar="KIND=VALUE", help="override default severities")
    ev.add_argument("--copies", type=int, default=2, help="planted versions of each training digit")
    ev.add_argument("--train-images", type=int, default=None, help="use only this many training digits (quick runs)")
    ev.add_argument("--test-images", type=int, default=None, help="use only this many held-out digits (quick runs)")
    ev.add_argument("--no-cross", action="store_true", help="skip the cross-kind table")
    ev.add_argument("--out", default="runs/planted", help="folder for results.json and the overlay grids")
    ev.add_argument("--overwrite", action="store_true", help="replace the results in --out (refused otherwise)")
    _model_args(ev, image_size=32, channels=1)
    _fit_args(ev)
    ev.set_defaults(func=_eval_planted)

    fam = sub.add_parser("fam", help="flaw maps of a folder, image or tensor file: overlays, mFAM")
    fam.add_argument("--highlighter", required=True, help="checkpoint from 'srdiff highlighter train'")
    fam.add_argument("--images", required=True,
                     help="an image folder (unreadable files are skipped with a warning), one image file, or a tensor "
                          "file (N, C, H, W): uint8 0..255 or float in [0, 1] or [-1, 1]")
    fam.add_argument("--out", required=True, help="output folder")
    fam.add_argument("--scale", type=int, default=1,
                     help="nearest-neighbour upscaling of the overlays, the contact sheet and mfam.png (default 1: "
                          "the highlighter's resolution)")
    fam.add_argument("--batch-size", type=int, default=32)
    fam.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    fam.add_argument("--overwrite", action="store_true", help="replace output files that exist (refused otherwise)")
    fam.set_defaults(func=_fam)


def _model_args(p: argparse.ArgumentParser, image_size: int = 32, channels: int = 3) -> None:
    p.add_argument("--backbone", default="small", help="small, vgg16, vgg16_bn or a torchvision model name")
    p.add_argument("--image-size", type=int, default=image_size)
    p.add_argument("--channels", type=int, default=channels, choices=(1, 3))
    p.add_argument("--target-layers", nargs="+", default=None, help="Grad-CAM layer names (default: the backbone's)")
    p.add_argument("--width", type=int, default=None, help="small backbone: first-stage channels")
    p.add_argument("--head", default=None, help="linear, mlp or map")
    p.add_argument("--pool", default=None, help="avg, max or lse")
    p.add_argument("--map-stride", type=int, default=None, help="vgg: 16, 8 or 4")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def _fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--shift", type=int, default=None, help="augmentation: random translations up to N px (default 0)")
    p.add_argument("--no-flip", action="store_true", help="augmentation: no random horizontal flips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _model_kwargs(args) -> dict:
    names = {"target_layers": "target_layers", "width": "width", "head": "head", "pool": "pool",
             "map_stride": "map_stride"}
    kwargs = {k: getattr(args, a) for k, a in names.items() if getattr(args, a) is not None}
    return {"backbone": args.backbone, **kwargs}


def _fit_kwargs(args) -> dict:
    kwargs = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "shift") if getattr(args, k) is not None}
    return {**kwargs, "flip": not args.no_flip, "progress": not args.quiet}


def _train(args) -> None:
    import torch

    from srdiff._device import resolve_device
    from srdiff.data import load_images
    from srdiff.highlighter import FlawHighlighter, planted
    from srdiff.run_dir import refuse_existing

    refuse_existing([args.out, *([args.history] if args.history else [])], overwrite=args.overwrite)
    torch.manual_seed(args.seed)
    real = load_images(args.real, args.image_size, args.channels)
    if args.fake.startswith(PLANTED_PREFIX):
        fake, _ = planted.plant(real, args.fake[len(PLANTED_PREFIX):], generator=torch.Generator().manual_seed(args.seed))
    else:
        fake = load_images(args.fake, args.image_size, args.channels)
    print(f"{len(real)} real and {len(fake)} fake images at {args.image_size} px")
    hl = FlawHighlighter(in_channels=args.channels, image_size=args.image_size, **_model_kwargs(args))
    if args.weights:
        hl.load_backbone_weights(args.weights)
    hl.to(resolve_device(args.device))
    history = hl.fit(real, fake, seed=args.seed, **_fit_kwargs(args))
    for h in history:
        print(f"epoch {h['epoch']:3d}  train loss {h['train_loss']:.4f}  val loss {h.get('loss', float('nan')):.4f}  "
              f"acc {h.get('accuracy', float('nan')):.3f}  bal acc {h.get('balanced_accuracy', float('nan')):.3f}  "
              f"auc {h.get('roc_auc', float('nan')):.3f}")
    hl.save(args.out)
    if args.history:
        Path(args.history).write_text(json.dumps(history, indent=2))
    print(f"wrote {args.out}")


def _parse_severity(items: list[str]) -> dict:
    from srdiff.highlighter.planted import KINDS

    out = {}
    for item in items:
        kind, sep, value = item.partition("=")
        if not sep or kind not in KINDS:
            raise ValueError(f"--severity takes KIND=VALUE with KIND in {KINDS}, got {item!r}")
        try:
            out[kind] = float(value)
        except ValueError:
            raise ValueError(f"--severity {kind}= takes a number, got {value!r}") from None
    return out


def _eval_planted(args) -> None:
    import torch

    from srdiff._device import resolve_device
    from srdiff.highlighter import planted
    from srdiff.run_dir import refuse_existing
    from srdiff.viz import save_grid

    kinds = args.kinds or list(planted.KINDS)
    for k in kinds:
        if k != "all" and k not in planted.KINDS:
            raise ValueError(f"--kinds takes {planted.KINDS} or 'all', got {k!r}")
    severity = _parse_severity(args.severity)
    out = Path(args.out)
    refuse_existing([out / "results.json", out / "overlay-grid.png"], overwrite=args.overwrite)
    model = _model_kwargs(args)
    results, pictures = planted.run(
        kinds, size=args.image_size, severity=severity, copies=args.copies, model=model,
        fit=_fit_kwargs(args), cross=not args.no_cross, seed=args.seed, train_images=args.train_images,
        test_images=args.test_images, device=resolve_device(args.device),
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    rows = []
    for kind, per_eval in pictures.items():
        for k, (fakes, fams, boxes) in per_eval.items():
            grid = planted.overlay_grid(fakes, fams, boxes, n=8)
            save_grid(grid, out / f"overlay-{kind}-{k}.png", nrow=16, upscale=4)
            if kind == k or kind == "all":
                rows.append(grid)
    save_grid(torch.cat(rows), out / "overlay-grid.png", nrow=16, upscale=4)
    print(planted.format_table(results))
    print(f"wrote {out / 'results.json'} and {out / 'overlay-grid.png'}")


def _fam(args) -> None:
    import torch
    from tqdm.auto import tqdm

    from srdiff._device import resolve_device
    from srdiff.data import read_images
    from srdiff.highlighter import FlawHighlighter
    from srdiff.run_dir import refuse_existing
    from srdiff.viz import colormap, overlay, save_grid, save_png

    if args.scale < 1:
        raise ValueError(f"--scale must be >= 1, got {args.scale}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    hl = FlawHighlighter.load(args.highlighter, map_location=device)
    images, names = read_images(args.images, hl.image_size, hl.in_channels)
    out = Path(args.out)
    outputs = [out / "contact-sheet.png", out / "mfam.png", out / "mfam.pt"]
    refuse_existing([*(out / "overlays" / f"{name}.png" for name in names), *outputs], overwrite=args.overwrite)
    fams = []
    for start in tqdm(range(0, len(images), args.batch_size), desc="FAMs", unit="batch"):
        fams.append(hl.fam(images[start : start + args.batch_size].to(device)).cpu())
    fams = torch.cat(fams)
    overlays = overlay(images, fams)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    for name, picture in zip(names, overlays):
        save_png(picture, out / "overlays" / f"{name}.png", upscale=args.scale)
    save_grid(overlays, outputs[0], upscale=args.scale)
    mfam = fams.mean(dim=0)
    save_png(colormap(mfam), outputs[1], upscale=args.scale)
    torch.save(mfam, outputs[2])
    print(f"{len(images)} FAMs -> {out / 'overlays'}, contact-sheet.png, mfam.png, mfam.pt")
