"""Training-free flaw repair: find flaws with a highlighter's FAMs, re-denoise only there.

Per image: the flaw mask is the FAM above a threshold, dilated and feathered; the image is re-denoised
inside it by RePaint (:mod:`srdiff.diffusion.repaint`: noised to the timestep ``strength`` selects,
composed with the input at every step, optional resampling jumps), so the pixels outside the mask are
the input's, bit for bit; rounds repeat on the images the highlighter still flags. :func:`sdedit` is
the unmasked baseline (SDEdit, Meng et al. 2022): the same loop with a mask of ones.

Follow a call: :func:`repair_flaws` checks its arguments, flags images (``highlighter.predict``), makes
their masks (:func:`flaw_masks` of ``highlighter.fam``) and runs
:func:`srdiff.diffusion.repaint.repaint_images` (batches, per-image generators, VAE encode/decode, the
paste) -> :func:`srdiff.diffusion.repaint.repaint` (the loop: ``scheduler.step``, then
:func:`~srdiff.diffusion.repaint.compose` with the noised input); rounds repeat on what is still flagged.

Works with every checkpoint the trainer makes, every task and backbone, through the task's own denoiser
call (``srdiff.load_trained(path).denoiser(class_labels=..., prompts=...)``: a
:class:`~srdiff.diffusion.denoiser.Denoiser` carrying the conditions, guidance, noise schedule and VAE),
and with any plain denoiser called ``model(x_t, t, **kwargs)`` (a diffusers ``UNet2DModel``, whose
output's ``.sample`` is used, or a callable returning the prediction the scheduler expects) with any
diffusers scheduler with ``add_noise``, ``set_timesteps`` and ``step``, in pixel space ([-1, 1]) or in
the latent space of a VAE (``AutoencoderKL`` or ``VQModel``).
"""

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from srdiff._checks import check_choice, check_int, check_tensor
from srdiff.diffusion.denoiser import Denoiser, gives_denoiser
from srdiff.diffusion.masks import check_masks
from srdiff.diffusion.repaint import jump_schedule, repaint_images
from srdiff.diffusion.schedules import check_strength

THRESHOLD_MODES = ("relative", "absolute")


# ---------------------------------------------------------------- masks
def flaw_masks(fams: torch.Tensor, *, threshold: float = 0.5, threshold_mode: str = "relative", dilate: int = 1,
               feather: int = 1) -> torch.Tensor:
    """Flaw masks from flaw maps.

    Args:
        fams: (B, H, W) maps, >= 0 (the highlighter's FAMs are in [0, 1]).
        threshold: in [0, 1]. ``threshold_mode="relative"``: a pixel is flagged where
            ``fam >= threshold * fam.max()`` of its own image (an all-zero map flags nothing);
            ``"absolute"``: where ``fam >= threshold``. srdiff's FAMs are min-max scaled per image, so
            for them the two agree; "relative" also suits maps on another scale.
        dilate: grow the flagged region by this many pixels (a square neighbourhood).
        feather: then let the mask fall from 1 to 0 over this many pixels outside the region (a box
            blur of the region grown by ``feather``): 1 on the region, 0 beyond ``2 * feather`` px of it.

    Returns:
        (B, 1, H, W) float32 in [0, 1] (srdiff's mask convention); exactly 0 where nothing may change.
    """
    check_tensor("fams", fams, ndim=3, floating=True)
    check_mask_args(threshold, threshold_mode, dilate, feather)
    fams = fams.float()
    peak = fams.flatten(1).amax(dim=1).view(-1, 1, 1) if len(fams) else fams.new_zeros(0, 1, 1)
    cut = threshold * peak if threshold_mode == "relative" else fams.new_full(peak.shape, float(threshold))
    hard = ((fams >= cut) & (fams > 0)).float()[:, None]
    hard = _grow(hard, dilate)
    if feather:
        hard = F.avg_pool2d(_grow(hard, feather), 2 * feather + 1, stride=1, padding=feather,
                            count_include_pad=False)
    return hard


def check_mask_args(threshold, threshold_mode: str, dilate, feather) -> None:
    """Raise ``ValueError`` naming the first bad :func:`flaw_masks` setting."""
    check_choice("threshold_mode", threshold_mode, THRESHOLD_MODES)
    _check_fraction("threshold", threshold)
    check_int("dilate", dilate, 0)
    check_int("feather", feather, 0)


def _grow(mask: torch.Tensor, px: int) -> torch.Tensor:
    return F.max_pool2d(mask, 2 * px + 1, stride=1, padding=px) if px else mask


# ---------------------------------------------------------------- the public functions
def _device(model, images: torch.Tensor) -> torch.device:
    if isinstance(model, nn.Module):
        param = next(model.parameters(), None)
        if param is not None:
            return param.device
    return images.device


def _check_images(images) -> None:
    check_tensor("images", images, ndim=4, floating=True)
    if images.numel() and not (bool((images >= 0).all()) and bool((images <= 1).all())):
        raise ValueError(f"images must lie in [0, 1], got values in [{images.min().item()}, {images.max().item()}]")


def _check_fraction(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r} ({type(value).__name__})")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_labels(class_labels, B: int):
    if class_labels is None:
        return None
    check_tensor("class_labels", class_labels, ndim=1)
    if len(class_labels) != B:
        raise ValueError(f"class_labels must have one label per image ({B}), got shape {tuple(class_labels.shape)}")
    return class_labels


def _as_denoiser(model, images: torch.Tensor, *, scheduler=None, vae=None, class_labels=None,
                 model_kwargs: dict | None = None) -> Denoiser:
    """``model`` as the :class:`~srdiff.diffusion.denoiser.Denoiser` RePaint calls, for ``images``.

    A :class:`Denoiser` (a trained srdiff model's ``trained.denoiser(class_labels=..., prompts=...)``)
    carries its VAE and conditions, so ``vae``, ``class_labels`` and ``model_kwargs`` are refused beside
    it; ``scheduler`` replaces its own. A plain model (``model(x_t, t, **kwargs)``) needs ``scheduler``
    and takes the rest. Raises ``ValueError``/``TypeError`` naming the argument."""
    if isinstance(model, Denoiser):
        for name, value in (("vae", vae), ("class_labels", class_labels), ("model_kwargs", model_kwargs)):
            if value is not None:
                raise ValueError(f"{name} must not be given with a Denoiser, which carries its own VAE and "
                                 "conditions (made by trained.denoiser(class_labels=..., prompts=...)); got "
                                 f"{name} of type {type(value).__name__}")
        if model.count is not None and model.count != len(images):
            raise ValueError(f"model carries the conditions of {model.count} images (the class_labels or "
                             f"prompts it was made with), but images holds {len(images)}")
        if scheduler is not None:
            return replace(model, scheduler=scheduler)
        if model.scheduler is None:
            raise ValueError("scheduler is needed: this Denoiser carries none")
        return model
    if gives_denoiser(model):
        raise TypeError(f"model is a trained srdiff model ({type(model).__name__}): pass "
                        "model.denoiser(class_labels=..., prompts=..., guidance_scale=...), its task's own "
                        "denoiser call with its conditions, scheduler and VAE")
    if not callable(model):
        raise TypeError(f"model must be a denoiser called model(x_t, t, **kwargs) or a Denoiser, got "
                        f"{type(model).__name__}")
    if scheduler is None:
        raise ValueError("scheduler is needed for a plain model: the diffusers scheduler of its noise schedule")
    device = _device(model, images)
    labels = _check_labels(class_labels, len(images))
    return Denoiser.from_model(model, device=device, scheduler=scheduler, vae=vae, model_kwargs=model_kwargs,
                               class_labels=None if labels is None else labels.to(device))


@torch.no_grad()
def sdedit(images: torch.Tensor, model, *, scheduler=None, strength: float = 0.5, steps: int = 50,
           seed: int = 0, vae=None, class_labels=None, model_kwargs: dict | None = None, batch_size: int = 64,
           progress: bool = True) -> torch.Tensor:
    """SDEdit (the unmasked baseline): every image noised to ``strength`` and denoised, (B, C, H, W) in [0, 1].

    The same loop and noise as :func:`repair_flaws` with a mask of ones, so the two differ only in the mask.
    """
    _check_images(images)
    check_strength(strength)
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    denoiser = _as_denoiser(model, images, scheduler=scheduler, vae=vae, class_labels=class_labels,
                            model_kwargs=model_kwargs)
    x = images.to(denoiser.device).float()
    ones = torch.ones(len(x), 1, *x.shape[-2:], device=denoiser.device)
    edited = repaint_images(x, ones, denoiser.predictor, denoiser.scheduler, strength=strength, steps=steps,
                            seed=seed, vae=denoiser.vae, batch_size=batch_size, progress=progress, desc="sdedit")
    return edited.to(images.device)


@torch.no_grad()
def repair_flaws(
    images: torch.Tensor,
    model,
    highlighter=None,
    *,
    scheduler=None,
    threshold: float = 0.5,
    threshold_mode: str = "relative",
    dilate: int = 1,
    feather: int = 1,
    strength: float = 0.5,
    steps: int = 50,
    rounds: int = 1,
    flag_threshold: float = 0.5,
    only_flagged: bool = True,
    resample: int = 1,
    jump: int = 1,
    seed: int = 0,
    masks: torch.Tensor | None = None,
    vae=None,
    class_labels: torch.Tensor | None = None,
    model_kwargs: dict | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Find flaws with ``highlighter`` and re-denoise only there.

    Args:
        images: (B, C, H, W) in [0, 1], e.g. a model's samples.
        model: a trained srdiff model's :class:`~srdiff.diffusion.denoiser.Denoiser`
            (``srdiff.load_trained(path).denoiser(...)``: any task and backbone through the task's own
            denoiser call, with the class labels or prompts of the images, classifier-free guidance, the
            run's scheduler and VAE), or a plain denoiser called ``model(x_t, t, **model_kwargs)`` with
            ``t`` a 0-dim tensor: a diffusers UNet (``.sample`` of its output is used) or a callable
            returning the prediction ``scheduler`` expects. Runs on its device (a module's: its
            parameters'; the highlighter on its own).
        highlighter: a :class:`srdiff.FlawHighlighter` for C-channel images; masks come from
            ``highlighter.fam`` and flags from ``highlighter.predict`` (P(fake) >= ``flag_threshold``).
            Optional when ``masks`` is given and ``rounds == 1``.
        scheduler: a diffusers scheduler with ``add_noise``, ``set_timesteps`` and ``step`` (copied:
            the caller's is left as it was) of the schedule the model was trained with; needed for a plain
            model, replaces a Denoiser's own (the run's DDIM or DDPM).
        threshold, threshold_mode, dilate, feather: the mask (:func:`flaw_masks`).
        strength: in (0, 1]: how far the masked region is noised
            (:func:`srdiff.diffusion.schedules.strength_timesteps`);
            ``steps``: the scheduler's step count for the whole schedule (``int(steps * strength)`` run).
        rounds: repeat the repair (new FAM, new mask, new noise) on the images the highlighter still
            flags, up to this many rounds.
        only_flagged: repair only images the highlighter flags (``False``: every image with a non-empty mask).
        resample, jump: RePaint's resampling (:func:`srdiff.diffusion.repaint.jump_schedule`); 1: none.
        seed: the noise of image i in round r comes from its own generator seeded by (seed, r, i)
            (:func:`srdiff.diffusion.seeding.repaint_generators`): results do not depend on
            ``batch_size`` or the device's RNG.
        masks: (B, 1, H, W) in [0, 1] (or (B, H, W), or one for all) to use instead of the
            highlighter's (one round); every image with a non-empty mask is repaired, flagged or not.
        vae: for plain latent models (a Denoiser carries its own): images are encoded
            (``latent_dist.mode()`` x ``scaling_factor``), the
            mask is brought to the latent grid (a cell's largest pixel value), composition runs in
            latent space, the result is decoded and pasted into the input through the pixel mask.
        class_labels: (B,) labels for plain class-conditional UNets (passed as ``class_labels=``); a
            Denoiser carries its own.
        model_kwargs: more keyword arguments for a plain model (e.g. ``encoder_hidden_states``).

    Returns:
        ``(repaired, masks, report)``: repaired (B, C, H, W) in [0, 1] on ``images``' device, equal to
        ``images`` bit for bit wherever ``masks`` is 0; masks (B, 1, H, W), the largest mask of any round
        (0 for images left alone); report, a dict with the settings, per-image records
        (``p_fake_before``/``after``, ``flagged_before``/``after``, ``rounds``, ``mask_area``,
        ``mean_abs_change``) and a summary.
    """
    _check_images(images)
    check_strength(strength)
    check_int("steps", steps, 1)
    check_int("rounds", rounds, 1)
    check_int("batch_size", batch_size, 1)
    jump_schedule(1, jump, resample)
    check_mask_args(threshold, threshold_mode, dilate, feather)
    _check_fraction("flag_threshold", flag_threshold)
    if highlighter is None and (masks is None or rounds > 1):
        raise ValueError("a highlighter is needed unless masks are given and rounds == 1")
    if highlighter is not None and highlighter.in_channels != images.shape[1]:
        raise ValueError(f"the highlighter takes {highlighter.in_channels}-channel images, images have "
                         f"{images.shape[1]} channels (shape {tuple(images.shape)})")
    if masks is not None and rounds > 1:
        raise ValueError(f"given masks serve one round; rounds must be 1, got {rounds}")
    given = None if masks is None else check_masks(masks, images)
    denoiser = _as_denoiser(model, images, scheduler=scheduler, vae=vae, class_labels=class_labels,
                            model_kwargs=model_kwargs)
    device = denoiser.device
    current = images.to(device, torch.float32, copy=True)  # never the caller's tensor: it is written in place
    B = len(current)
    union = torch.zeros(B, 1, *current.shape[-2:], device=device)
    rounds_run = torch.zeros(B, dtype=torch.long)

    hl_device = _device(highlighter, current) if highlighter is not None else device

    def p_fake(x):
        if highlighter is None:
            return torch.full((len(x),), float("nan"))
        return highlighter.predict(x.to(hl_device)).float().cpu()

    p_before = p_fake(current) if B else torch.zeros(0)
    flagged = p_before >= flag_threshold
    active = torch.arange(B) if (given is not None or not only_flagged) else flagged.nonzero()[:, 0]
    for r in range(rounds):
        if len(active) == 0:
            break
        if given is not None:
            m = given.to(device)[active]
        else:
            fams = highlighter.fam(current[active.to(device)].to(hl_device)).to(device)
            m = flaw_masks(fams, threshold=threshold, threshold_mode=threshold_mode, dilate=dilate, feather=feather)
        keep = m.flatten(1).amax(dim=1).cpu() > 0
        active, m = active[keep], m[keep.to(device)]
        if len(active) == 0:
            break
        current[active.to(device)] = repaint_images(
            current, m.new_zeros(B, *m.shape[1:]).index_copy(0, active.to(device), m), denoiser.predictor,
            denoiser.scheduler, strength=strength, steps=steps, seed=seed, indices=active, round_index=r,
            resample=resample, jump=jump, vae=denoiser.vae, batch_size=batch_size, progress=progress,
            desc=f"repair round {r + 1}/{rounds}")
        union[active.to(device)] = torch.maximum(union[active.to(device)], m)
        rounds_run[active] += 1
        if r + 1 < rounds:
            still = p_fake(current[active.to(device)]) >= flag_threshold
            active = active[still]
    p_after = p_fake(current) if B else torch.zeros(0)
    report = _report(images.to(device).float(), current, union, p_before, p_after, flag_threshold, rounds_run,
                     settings=dict(threshold=threshold, threshold_mode=threshold_mode, dilate=dilate, feather=feather,
                                   strength=strength, steps=steps, rounds=rounds, flag_threshold=flag_threshold,
                                   only_flagged=only_flagged, resample=resample, jump=jump, seed=seed,
                                   masks_given=given is not None, latent=denoiser.vae is not None,
                                   scheduler=type(denoiser.scheduler).__name__))
    return current.to(images.device), union.to(images.device), report


def _report(before, after, masks, p_before, p_after, flag_threshold, rounds_run, settings) -> dict:
    change = (after - before).abs()
    outside = (masks == 0).expand_as(change)
    per_image = []
    for i in range(len(before)):
        rec = {"index": i, "rounds": int(rounds_run[i]), "mask_area": float((masks[i] > 0).float().mean()),
               "mean_abs_change": float(change[i].mean())}
        if not math.isnan(float(p_before[i])):
            rec.update(p_fake_before=float(p_before[i]), p_fake_after=float(p_after[i]),
                       flagged_before=bool(p_before[i] >= flag_threshold),
                       flagged_after=bool(p_after[i] >= flag_threshold))
        per_image.append(rec)
    n = max(1, len(before))
    summary = {
        "images": len(before),
        "repaired": int((rounds_run > 0).sum()),
        "mean_mask_area": float((masks > 0).float().mean()) if len(before) else 0.0,
        "mean_abs_change": float(change.mean()) if len(before) else 0.0,
        "max_abs_change_outside_mask": float(change[outside].max()) if bool(outside.any()) else 0.0,
    }
    if len(before) and not bool(p_before.isnan().any()):
        summary.update(flagged_before=int((p_before >= flag_threshold).sum()) / n,
                       flagged_after=int((p_after >= flag_threshold).sum()) / n)
    return {"settings": settings, "summary": summary, "images": per_image}
