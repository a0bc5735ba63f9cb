"""The planted-artifact benchmark: does a highlighter's FAM point at the flaw?

Fake images are real digits (scikit-learn's, upscaled) with one synthetic artifact inside a random
box, the ground truth. Six kinds imitate what diffusion models get wrong, the seventh is the easy
control:

=============  ==========================================================  ================
kind           what happens inside the box                                 severity (default)
=============  ==========================================================  ================
blur           Gaussian blur                                               sigma, px (1.5)
warp           smooth local displacement of the strokes                    peak shift, px (2.0)
noise          faint additive Gaussian noise                               std (0.1)
intensity      contrast scaled about the box mean, brightness shifted      1 - contrast (0.3)
duplicate      a stroke fragment from elsewhere in the digit pasted in     opacity (1.0)
break          a band across a stroke erased                               depth (1.0)
checkerboard   +-amplitude pixel checkerboard (the control)                amplitude (0.3)
=============  ==========================================================  ================

Pixel sizes (box, sigma, shift, band) are given at 32 px and scale with the image side. Every edit
fades in over a 2 px raised-cosine border inside the box, so no kind leaves a seam; kinds that act on
strokes (all but noise and checkerboard) centre their box on an ink pixel, and an edit that changes
the box by less than ``MIN_CHANGE`` on average is drawn again (a fake must be fake; after ``TRIES``
draws the strongest is kept, which only happens at severities far below the defaults).

:func:`plant` makes fakes; :func:`localisation_metrics` scores FAMs against boxes; :func:`run`
trains one highlighter per kind and fills the per-kind and cross-kind tables.
"""

import inspect
import math
import time

import torch
import torch.nn.functional as F

KINDS = ("blur", "warp", "noise", "intensity", "duplicate", "break", "checkerboard")
DEFAULT_SEVERITY = {"blur": 1.5, "warp": 2.0, "noise": 0.1, "intensity": 0.3, "duplicate": 1.0, "break": 1.0,
                    "checkerboard": 0.3}
ANYWHERE = ("noise", "checkerboard")  # visible on the background too; the others need strokes
BOX_SIDE = (8, 12)  # px at 32 px, inclusive: each side drawn uniformly
TAPER = 2.0  # px at 32 px
MIN_CHANGE = 0.01  # mean |fake - real| over the box
TRIES = 30
INK = 0.5  # a pixel above this is a stroke


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _scale(size: int) -> float:
    return size / 32.0


def window(boxes: torch.Tensor, H: int, W: int, taper: float) -> torch.Tensor:
    """(N, 1, H, W) masks: 1 inside each (y0, x0, y1, x1) box, fading to 0 over ``taper`` px at its
    border (raised cosine), 0 outside."""
    def axis(lo, hi, n):
        c = torch.arange(n, dtype=torch.float32) + 0.5
        inside = torch.minimum(c[None] - lo[:, None].float(), hi[:, None].float() - c[None])
        ramp = (inside / taper).clamp(0, 1)
        return 0.5 - 0.5 * torch.cos(math.pi * ramp)

    return (axis(boxes[:, 0], boxes[:, 2], H)[:, :, None] * axis(boxes[:, 1], boxes[:, 3], W)[:, None, :])[:, None]


def _sample_boxes(images: torch.Tensor, anywhere: bool, g: torch.Generator) -> torch.Tensor:
    N, _, H, W = images.shape
    lo, hi = (max(2, round(s * _scale(W))) for s in BOX_SIDE)
    sides = torch.randint(lo, hi + 1, (N, 2), generator=g)
    ink = images.mean(dim=1).flatten(1) > INK
    boxes = torch.empty(N, 4, dtype=torch.long)
    for i in range(N):
        if anywhere or not bool(ink[i].any()):
            cy, cx = torch.randint(H, (1,), generator=g).item(), torch.randint(W, (1,), generator=g).item()
        else:
            candidates = ink[i].nonzero()[:, 0]
            pick = candidates[torch.randint(len(candidates), (1,), generator=g)].item()
            cy, cx = divmod(pick, W)
        h, w = sides[i].tolist()
        y0, x0 = min(max(cy - h // 2, 0), H - h), min(max(cx - w // 2, 0), W - w)
        boxes[i] = torch.tensor([y0, x0, y0 + h, x0 + w])
    return boxes


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x)
    C = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def _box_mean(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    inside = box_masks(boxes, x.shape[2], x.shape[3])[:, None].to(x)
    return (x * inside).sum(dim=(2, 3), keepdim=True) / inside.sum(dim=(2, 3), keepdim=True)


def _duplicate_source(x: torch.Tensor, boxes: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image moved so that an inky region at least half a box away lands on the box."""
    N, _, H, W = x.shape
    out = torch.empty_like(x)
    ink = x.mean(dim=1) > INK
    for i in range(N):
        y0, x0, y1, x1 = boxes[i].tolist()
        h, w = y1 - y0, x1 - x0
        best, best_ink = (0, 0), -1.0
        for _ in range(24):
            sy = torch.randint(0, H - h + 1, (1,), generator=g).item()
            sx = torch.randint(0, W - w + 1, (1,), generator=g).item()
            if max(abs(sy - y0) / h, abs(sx - x0) / w) < 0.5:
                continue
            amount = ink[i, sy : sy + h, sx : sx + w].float().mean().item()
            if amount > best_ink:
                best, best_ink = (y0 - sy, x0 - sx), amount
            if amount > 0.15:
                break
        out[i] = torch.roll(x[i], shifts=best, dims=(1, 2))
    return out


def _edit(kind: str, x: torch.Tensor, boxes: torch.Tensor, severity: float, g: torch.Generator) -> torch.Tensor:
    """The artifact applied to whole images; :func:`plant` keeps it inside the boxes."""
    N, _, H, W = x.shape
    s = _scale(W)
    if kind == "blur":
        return _gaussian_blur(x, severity * s)
    if kind == "warp":
        angle = torch.rand(N, generator=g) * 2 * math.pi
        shift = severity * s * window(boxes, H, W, TAPER * s)[:, 0]  # (N, H, W) px
        ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
        src_x = xs - shift * torch.cos(angle)[:, None, None]
        src_y = ys - shift * torch.sin(angle)[:, None, None]
        grid = torch.stack([2 * src_x / W - 1, 2 * src_y / H - 1], dim=-1)
        return F.grid_sample(x, grid.to(x), mode="bilinear", padding_mode="border", align_corners=False)
    if kind == "noise":
        return (x + severity * torch.randn(x.shape, generator=g).to(x)).clamp(0, 1)
    if kind == "intensity":
        sign = torch.where(torch.rand(N, generator=g) < 0.5, -1.0, 1.0).to(x)[:, None, None, None]
        m = _box_mean(x, boxes)
        return (m + (x - m) * (1 - severity) + sign * severity / 2).clamp(0, 1)
    if kind == "duplicate":
        return torch.maximum(x, severity * _duplicate_source(x, boxes, g))
    if kind == "break":
        angle = torch.rand(N, generator=g)[:, None, None] * math.pi
        cy = (boxes[:, 0] + boxes[:, 2]).float()[:, None, None] / 2
        cx = (boxes[:, 1] + boxes[:, 3]).float()[:, None, None] / 2
        ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
        dist = ((ys - cy) * torch.cos(angle) - (xs - cx) * torch.sin(angle)).abs()
        band = (1.5 * s + 0.5 - dist).clamp(0, 1)[:, None]  # 3 px wide at 32 px, 1 px soft edges
        return x * (1 - severity * band.to(x))
    cell = max(1, round(s))
    ys, xs = torch.meshgrid(torch.arange(H) // cell, torch.arange(W) // cell, indexing="ij")
    checker = (((ys + xs) % 2) * 2 - 1).to(x)
    return (x + severity * checker).clamp(0, 1)


def plant(
    images: torch.Tensor, kind: str, severity: float | None = None, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fakes from real images: one ``kind`` artifact per image inside a random box.

    Args:
        images: (N, C, H, W) in [0, 1] (CPU).
        kind: one of :data:`KINDS`; severity: its strength (default :data:`DEFAULT_SEVERITY`).
        generator: the randomness (boxes, directions, noise); default the global RNG.

    Returns:
        fakes (N, C, H, W) in [0, 1], and boxes (N, 4) long (y0, x0, y1, x1), ends exclusive.
    """
    _check_kind(kind)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    severity = DEFAULT_SEVERITY[kind] if severity is None else float(severity)
    if not severity > 0:
        raise ValueError(f"severity must be > 0, got {severity}")
    x = images.detach().float().cpu()
    N, _, H, W = x.shape
    fakes, boxes = x.clone(), torch.zeros(N, 4, dtype=torch.long)
    best = torch.full((N,), -1.0)
    todo = torch.arange(N)
    for _ in range(TRIES):
        sub = x[todo]
        b = _sample_boxes(sub, kind in ANYWHERE, generator)
        out = sub + window(b, H, W, TAPER * _scale(W)) * (_edit(kind, sub, b, severity, generator) - sub)
        inside = box_masks(b, H, W)[:, None]
        change = ((out - sub).abs() * inside).sum(dim=(1, 2, 3)) / (inside.sum(dim=(1, 2, 3)) * x.shape[1])
        better = change > best[todo]
        fakes[todo[better]], boxes[todo[better]], best[todo[better]] = out[better], b[better], change[better]
        todo = todo[best[todo] < MIN_CHANGE]
        if len(todo) == 0:
            break
    if bool((best <= 0).any()):
        raise ValueError(f"{int((best <= 0).sum())} image(s) admit no {kind} edit of severity {severity}: blank images?")
    return fakes, boxes


def box_masks(boxes: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(N, H, W) bool: inside each box."""
    ys, xs = torch.arange(H)[None, :, None], torch.arange(W)[None, None, :]
    b = boxes[:, :, None, None]
    return (ys >= b[:, 0]) & (ys < b[:, 2]) & (xs >= b[:, 1]) & (xs < b[:, 3])


def argmax_yx(maps: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> (N, 2) row, column of each map's maximum (first one in raster order on ties)."""
    idx = maps.flatten(1).argmax(dim=1)
    return torch.stack([idx // maps.shape[2], idx % maps.shape[2]], dim=1)


def localisation_metrics(fams: torch.Tensor, boxes: torch.Tensor, threshold: float = 0.5) -> dict:
    """Pointing accuracy (argmax inside the box), mean IoU of ``fam >= threshold`` with the box, and the
    box-area fraction (what a uniformly random point scores)."""
    fams = fams.detach().float().cpu()
    N, H, W = fams.shape
    inside = box_masks(boxes, H, W)
    yx = argmax_yx(fams)
    hits = inside[torch.arange(N), yx[:, 0], yx[:, 1]]
    hot = fams >= threshold
    iou = (hot & inside).flatten(1).sum(1).float() / (hot | inside).flatten(1).sum(1).float().clamp_min(1)
    return {"pointing": hits.float().mean().item(), "iou": iou.mean().item(),
            "chance": inside.flatten(1).float().mean().item()}


def argmax_spread(fams: torch.Tensor) -> dict:
    """Where FAMs of images with no artifact point. ``empty``: the share of all-zero maps (no fake
    evidence anywhere: the map points nowhere); over the other maps, ``distinct`` argmax pixels, the
    largest share of them on one pixel (``top_share``) and the spread (mean std, px) of the argmax row
    and column. A highlighter that always points at one place has top_share near 1."""
    fams = fams.detach().float().cpu()
    empty = fams.flatten(1).amax(dim=1) <= 0
    yx = argmax_yx(fams[~empty]).float()
    out = {"empty": empty.float().mean().item(), "distinct": 0, "top_share": 0.0, "std_px": 0.0}
    if len(yx):
        _, counts = torch.unique(yx, dim=0, return_counts=True)
        out.update(distinct=len(counts), top_share=(counts.max() / len(yx)).item(),
                   std_px=yx.std(dim=0).mean().item() if len(yx) > 1 else 0.0)
    return out


def overlay_grid(images: torch.Tensor, fams: torch.Tensor, boxes: torch.Tensor, n: int = 16) -> torch.Tensor:
    """(2n, 3, H, W): each fake, then its FAM overlay, the ground-truth box drawn in white on both."""
    from srdiff.viz import overlay

    images, fams, boxes = images[:n].cpu(), fams[:n].cpu(), boxes[:n]
    rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    pics = []
    for img, ov, box in zip(rgb, overlay(images, fams), boxes):
        for p in (img.clone(), ov.clone()):
            y0, x0, y1, x1 = box.tolist()
            p[:, y0, x0:x1] = p[:, y1 - 1, x0:x1] = 1.0
            p[:, y0:y1, x0] = p[:, y0:y1, x1 - 1] = 1.0
            pics.append(p)
    return torch.stack(pics)


def digit_split(size: int = 32, holdout: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits at ``size`` px, split into (train, held-out) source images."""
    from srdiff.data import digits, split

    return split(digits(size)[0], holdout=holdout, seed=seed)


def make_fakes(images: torch.Tensor, kinds, severity: dict, copies: int, generator: torch.Generator):
    """``copies`` planted versions of every image (with several kinds, image i of copy c gets kind
    (i + c) mod len(kinds)); returns fakes (copies*N, C, H, W) and boxes (copies*N, 4)."""
    fakes, boxes = [], []
    turn = torch.arange(len(images))
    for c in range(copies):
        for j, kind in enumerate(kinds):
            f, b = plant(images[(turn + c) % len(kinds) == j], kind, severity.get(kind), generator=generator)
            fakes.append(f)
            boxes.append(b)
    return torch.cat(fakes), torch.cat(boxes)


def train_highlighter(train: torch.Tensor, kinds, *, severity: dict, copies: int, model: dict, fit: dict, seed: int,
                      device=None):
    """A highlighter trained on ``train`` (real) vs their planted versions (fake); returns it and its history."""
    from srdiff.highlighter.model import FlawHighlighter

    fakes, _ = make_fakes(train, kinds, severity, copies, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    hl = FlawHighlighter(in_channels=train.shape[1], image_size=train.shape[-1], **model).to(device)
    history = hl.fit(train, fakes, seed=seed, **fit)
    return hl, history


def evaluate(hl, test: torch.Tensor, kind: str, *, severity: float | None, seed: int, real_fams=None,
             plain: bool = True):
    """Real/fake accuracy and ROC-AUC on ``test`` and its planted ``kind`` versions, and how the FAMs of
    the fakes localise (:func:`localisation_metrics`; with ``plain``, also ``pointing_plain`` and
    ``iou_plain`` for FAMs without the mirror average); ``twin_pointing`` scores the FAMs of the clean
    twins (``real_fams``, computed if not given) against the same boxes: a highlighter that points at
    the same place whatever the image scores as well there as on the fakes.

    Returns (metrics dict, (fakes, fams, boxes)) for :func:`overlay_grid`."""
    from srdiff.highlighter.training import evaluate as classify

    fakes, boxes = plant(test, kind, severity, generator=torch.Generator().manual_seed(seed))
    labels = torch.cat([torch.zeros(len(test), dtype=torch.long), torch.ones(len(fakes), dtype=torch.long)])
    cls = classify(hl, torch.cat([test, fakes]), labels)
    device = next(hl.parameters()).device
    fams = hl.fam(fakes.to(device)).cpu()
    real_fams = hl.fam(test.to(device)).cpu() if real_fams is None else real_fams
    out = {"accuracy": cls["accuracy"], "balanced_accuracy": cls["balanced_accuracy"], "roc_auc": cls["roc_auc"]}
    out.update(localisation_metrics(fams, boxes))
    if plain:
        unmirrored = localisation_metrics(hl.fam(fakes.to(device), mirror=False).cpu(), boxes)
        out.update(pointing_plain=unmirrored["pointing"], iou_plain=unmirrored["iou"])
    out["twin_pointing"] = localisation_metrics(real_fams, boxes)["pointing"]
    return out, (fakes, fams, boxes)


def run(
    kinds=KINDS,
    *,
    size: int = 32,
    severity: dict | None = None,
    copies: int = 2,
    model: dict | None = None,
    fit: dict | None = None,
    cross: bool = True,
    seed: int = 0,
    holdout: float = 0.2,
    train_images: int | None = None,
    test_images: int | None = None,
    device=None,
    log=print,
) -> tuple[dict, dict]:
    """Train one highlighter per kind (``"all"``: one on every kind at once) on planted digits and
    evaluate it on held-out digits: per-kind metrics, the argmax spread on real images, and with
    ``cross`` every highlighter on every kind. Returns (results, pictures) where pictures maps a
    kind to its (fakes, fams, boxes) for :func:`overlay_grid`."""
    severity = dict(severity or {})
    model, fit = dict(model or {}), dict(fit or {})
    train, test = digit_split(size, holdout, seed)
    train, test = train[:train_images], test[:test_images]
    from srdiff.highlighter.training import fit as fit_fn

    recipe = {n: p.default for n, p in inspect.signature(fit_fn).parameters.items() if p.default is not p.empty}
    recipe.update(fit)
    results = {"config": {"kinds": list(kinds), "size": size, "copies": copies, "model": model, "fit": recipe,
                          "severity": {k: severity.get(k, DEFAULT_SEVERITY[k]) for k in KINDS}, "seed": seed,
                          "train_images": len(train), "test_images": len(test)},
               "per_kind": {}, "cross": {}}
    pictures, highlighters = {}, {}
    for kind in kinds:
        train_kinds = KINDS if kind == "all" else (kind,)
        for k in train_kinds:
            _check_kind(k)
        start = time.perf_counter()
        hl, history = train_highlighter(train, train_kinds, severity=severity, copies=copies, model=model, fit=fit,
                                        seed=seed, device=device)
        seconds = time.perf_counter() - start
        real_fams = hl.fam(test.to(device)).cpu()
        row = {"train_seconds": seconds, "epochs_run": len(history), "val": history[-1] if history else {},
               "highlighter": hl.config}
        row["real_spread"] = argmax_spread(real_fams)
        for k in train_kinds:
            metrics, pics = evaluate(hl, test, k, severity=severity.get(k), seed=seed + 1, real_fams=real_fams)
            row[k] = metrics
            pictures.setdefault(kind, {})[k] = pics
        results["per_kind"][kind] = row
        highlighters[kind] = (hl, real_fams)
        summary = ", ".join(f"{k}: acc {row[k]['accuracy']:.3f} pointing {row[k]['pointing']:.3f} iou {row[k]['iou']:.3f}"
                            for k in train_kinds)
        spread = row["real_spread"]
        log(f"[{kind}] {seconds:.0f} s, {len(history)} epochs; {summary}; clean images: {spread['empty']:.0%} empty "
            f"maps, the rest on {spread['distinct']} pixels (top share {spread['top_share']:.2f})")
    if cross:
        for kind, (hl, real_fams) in highlighters.items():
            row = results["per_kind"][kind]
            results["cross"][kind] = {}
            for k in KINDS:  # the kinds it trained on were evaluated above, with the same seed
                metrics = row[k] if k in row else evaluate(hl, test, k, severity=severity.get(k), seed=seed + 1,
                                                           real_fams=real_fams, plain=False)[0]
                results["cross"][kind][k] = {m: metrics[m] for m in ("accuracy", "pointing", "iou")}
    return results, pictures


def format_table(results: dict) -> str:
    """The per-kind table (and the cross-kind pointing table, when present) as Markdown."""
    lines = ["| trained on | evaluated on | accuracy | ROC-AUC | pointing | IoU | pointing, IoU without mirror | chance | "
             "twin pointing | clean images: empty / distinct argmax / top share |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, row in results["per_kind"].items():
        spread = row["real_spread"]
        for k in (KINDS if kind == "all" else (kind,)):
            m = row[k]
            lines.append(f"| {kind} | {k} | {m['accuracy']:.3f} | {m['roc_auc']:.3f} | {m['pointing']:.3f} | "
                         f"{m['iou']:.3f} | {m['pointing_plain']:.3f}, {m['iou_plain']:.3f} | {m['chance']:.3f} | "
                         f"{m['twin_pointing']:.3f} | {spread['empty']:.2f} / {spread['distinct']} / {spread['top_share']:.2f} |")
    if results.get("cross"):
        lines += ["", "Cross-kind pointing (accuracy): rows trained on, columns evaluated on", "",
                  "| trained on | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
        for kind, row in results["cross"].items():
            lines.append(f"| {kind} | " + " | ".join(f"{row[k]['pointing']:.2f} ({row[k]['accuracy']:.2f})" for k in KINDS) + " |")
    return "\n".join(lines)
