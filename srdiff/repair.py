"""Training-free flaw repair: find flaws with a highlighter's FAMs, re-denoise only there.

Per image: the flaw mask is the FAM above a threshold, dilated and feathered; the image is noised to
the timestep ``strength`` selects and denoised with RePaint-style composition (Lugmayr et al. 2022): at
every step the region outside the mask is the input noised to that step, inside it the model's
state, with optional resampling jumps (re-noise ``jump`` steps, denoise again). At the end the pixels
outside the mask are the input's, bit for bit. :func:`sdedit` is the unmasked baseline (SDEdit, Meng
et al. 2022): the same loop with a mask of ones.

Works with any denoiser called ``model(x_t, t, **kwargs)`` (a diffusers ``UNet2DModel``, whose output's
``.sample`` is used, or a plain callable returning the prediction the scheduler expects), any
diffusers scheduler with ``add_noise``, ``set_timesteps`` and ``step``, in pixel space ([-1, 1]) or
in the latent space of a VAE (``AutoencoderKL`` or ``VQModel``).
"""

import hashlib
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from srdiff._checks import check_choice, check_tensor

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
        (B, H, W) float32 in [0, 1]; exactly 0 where nothing may change.
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
    return hard[:, 0]


def check_mask_args(threshold, threshold_mode: str, dilate, feather) -> None:
    """Raise ``ValueError`` naming the first bad :func:`flaw_masks` setting."""
    check_choice("threshold_mode", threshold_mode, THRESHOLD_MODES)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    _check_int("dilate", dilate, 0)
    _check_int("feather", feather, 0)


def _grow(mask: torch.Tensor, px: int) -> torch.Tensor:
    return F.max_pool2d(mask, 2 * px + 1, stride=1, padding=px) if px else mask


def check_masks(masks, images: torch.Tensor) -> torch.Tensor:
    """``masks`` as (B, H, W) float in [0, 1] matching ``images`` (B, C, H, W); (B, 1, H, W) is accepted."""
    check_tensor("masks", masks, ndim=(3, 4), floating=True)
    if masks.dim() == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"masks must be (B, H, W) or (B, 1, H, W), got shape {tuple(masks.shape)}")
        masks = masks[:, 0]
    B, _, H, W = images.shape
    if tuple(masks.shape) != (B, H, W):
        raise ValueError(f"masks shape {tuple(masks.shape)} does not match images {tuple(images.shape)}: "
                         f"need ({B}, {H}, {W})")
    if len(masks) and not (bool((masks >= 0).all()) and bool((masks <= 1).all())):
        raise ValueError(f"masks must lie in [0, 1], got values in [{masks.min().item()}, {masks.max().item()}]")
    return masks.float()


# ---------------------------------------------------------------- schedule
def strength_timesteps(scheduler, strength: float, steps: int) -> torch.Tensor:
    """The timesteps a repair of ``strength`` runs, as diffusers' img2img pipelines pick them.

    ``scheduler.set_timesteps(steps)`` spaces ``steps`` timesteps over the schedule; the last
    ``int(steps * strength)`` of them (at least one) are run, so ``strength=1`` starts
    from the noisiest timestep and ``strength=0.5`` from the middle one. Sets the scheduler's timesteps
    (and its begin index, where it has one).
    """
    _check_strength(strength)
    _check_int("steps", steps, 1)
    scheduler.set_timesteps(steps)
    run = run_steps(steps, strength)
    start = (steps - run) * getattr(scheduler, "order", 1)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def run_steps(steps: int, strength: float) -> int:
    """How many of ``steps`` denoising steps a repair of ``strength`` runs: ``int(steps * strength)``, at least 1."""
    return max(1, min(steps, int(steps * strength)))


def _check_strength(strength) -> None:
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")


def jump_schedule(n: int, jump: int, resample: int) -> list[int]:
    """RePaint's schedule over ``n`` denoising steps as index moves: +1 denoises one step, -k re-noises
    k steps. With ``resample`` r > 1, after every ``jump`` steps (except the last) the state is sent
    ``jump`` steps back and denoised again, r - 1 times: ``n * (1 + 2 * (r - 1))`` model calls at most
    (RePaint: jump 10, r 10). ``resample=1``: plain denoising, ``[+1] * n``."""
    _check_int("jump", jump, 1)
    _check_int("resample", resample, 1)
    moves, done, i = [], {}, 0
    while i < n:
        moves.append(1)
        i += 1
        if resample > 1 and i < n and i % jump == 0 and done.get(i, 0) < resample - 1:
            done[i] = done.get(i, 0) + 1
            back = min(jump, i)
            moves.append(-back)
            i -= back
    return moves


# ---------------------------------------------------------------- the composition loop
def compose(model_state: torch.Tensor, known_state: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask * model_state + (1 - mask) * known_state``, and exactly ``known_state`` where mask == 0.

    mask: (B, 1, h, w) in [0, 1], broadcast over channels."""
    return torch.where(mask > 0, torch.lerp(known_state, model_state, mask), known_state)


def _seed(seed: int, round_index: int, image_index: int) -> int:
    digest = hashlib.blake2b(f"srdiff.repair/{seed}/{round_index}/{image_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _randn(generators: list[torch.Generator], shape, device) -> torch.Tensor:
    """One standard-normal draw per image, each from its own CPU generator: results do not depend on
    batching or the device."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def _predict(model, x: torch.Tensor, t: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = model(x, t, **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "sample", out)


def _step_kwargs(scheduler, generators):
    params = inspect.signature(scheduler.step).parameters
    kwargs = {"generator": generators} if "generator" in params else {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    return kwargs


def repaint(x0: torch.Tensor, mask: torch.Tensor, model, scheduler, *, strength: float, steps: int,
            generators: list[torch.Generator], resample: int = 1, jump: int = 1, model_kwargs: dict | None = None,
            progress=None) -> torch.Tensor:
    """Re-denoise ``x0`` (B, c, h, w), in the model's space, inside ``mask`` (B, 1, h, w) in [0, 1].

    The state starts as ``x0`` noised to the first timestep :func:`strength_timesteps` gives. Each
    denoising move runs the model and ``scheduler.step``, then composes (:func:`compose`) with ``x0``
    noised afresh to the new timestep (``x0`` itself after the last step); each re-noising move of
    :func:`jump_schedule` draws ``q(x_a | x_b)`` from the scheduler's ``alphas_cumprod`` (one-step
    schedulers such as DDPM and DDIM only). ``generators``: one per image. Returns the final state,
    (B, c, h, w), equal to ``x0`` wherever the mask is 0.
    """
    timesteps = strength_timesteps(scheduler, strength, steps)
    moves = jump_schedule(len(timesteps), jump, resample)
    if resample > 1 and (not hasattr(scheduler, "alphas_cumprod") or hasattr(scheduler, "sigmas")):
        raise ValueError(f"resample > 1 needs a one-step alpha-schedule scheduler (DDPM, DDIM), got "
                         f"{type(scheduler).__name__}")
    B = len(x0)
    device, shape = x0.device, x0.shape[1:]
    model_kwargs = dict(model_kwargs or {})
    step_kwargs = _step_kwargs(scheduler, generators)

    def noised(index):
        if index == len(timesteps):
            return x0
        return scheduler.add_noise(x0, _randn(generators, shape, device), timesteps[index].expand(B).to(device))

    x, i = noised(0), 0
    for move in moves:
        if move == 1:
            t = timesteps[i]
            pred = _predict(model, scheduler.scale_model_input(x, t), t.to(device), model_kwargs)
            x = scheduler.step(pred.to(x.dtype), t, x, **step_kwargs).prev_sample
            i += 1
            x = compose(x, noised(i), mask)
        else:
            a_from = _alpha_bar(scheduler, timesteps, i, device)
            i += move
            ratio = _alpha_bar(scheduler, timesteps, i, device) / a_from
            x = ratio.sqrt() * x + (1 - ratio).sqrt() * _randn(generators, shape, device)
            x = compose(x, noised(i), mask)
        if progress is not None:
            progress.update(1)
    return x


def _alpha_bar(scheduler, timesteps, index, device) -> torch.Tensor:
    if index == len(timesteps):
        return torch.tensor(1.0, device=device)
    return scheduler.alphas_cumprod[int(timesteps[index])].to(device=device, dtype=torch.float32)


# ---------------------------------------------------------------- pixel <-> model space
def _encode(images: torch.Tensor, vae) -> torch.Tensor:
    x = images * 2 - 1
    if vae is None:
        return x
    encoded = vae.encode(x.to(next(vae.parameters()).dtype))
    latents = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
    return latents.float() * vae.config.scaling_factor


def _decode(x: torch.Tensor, vae) -> torch.Tensor:
    if vae is not None:
        x = vae.decode((x / vae.config.scaling_factor).to(next(vae.parameters()).dtype)).sample
    return ((x.float() + 1) / 2).clamp(0, 1)


def _model_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """(B, H, W) pixel mask -> (B, 1, h, w) on the model's grid: in a latent cell, the largest value of
    the pixels it covers (a cell changes if any of its pixels may)."""
    m = mask[:, None]
    return m if tuple(m.shape[-2:]) == tuple(size) else F.adaptive_max_pool2d(m, size)


def _redenoise(images, masks, model, scheduler, *, vae, strength, steps, generators, resample, jump,
               model_kwargs, progress) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1] re-denoised inside ``masks`` (B, H, W); outside them exactly the input."""
    x0 = _encode(images, vae)
    m = _model_mask(masks, x0.shape[-2:]).to(x0.dtype)
    out = _decode(repaint(x0, m, model, scheduler, strength=strength, steps=steps, generators=generators,
                          resample=resample, jump=jump, model_kwargs=model_kwargs, progress=progress), vae)
    pixel_mask = masks[:, None]
    blended = out if vae is None else torch.lerp(images, out, pixel_mask)
    return torch.where(pixel_mask > 0, blended, images)


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


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_labels(class_labels, B: int):
    if class_labels is None:
        return None
    check_tensor("class_labels", class_labels, ndim=1)
    if len(class_labels) != B:
        raise ValueError(f"class_labels must have one label per image ({B}), got shape {tuple(class_labels.shape)}")
    return class_labels


def _fresh(scheduler):
    """A copy of ``scheduler`` (its timesteps are set per call; the caller's stays as it was)."""
    for name in ("add_noise", "set_timesteps", "step"):
        if not callable(getattr(scheduler, name, None)):
            raise TypeError(f"scheduler must be a diffusers scheduler with add_noise, set_timesteps and step, "
                            f"got {type(scheduler).__name__} (no {name})")
    return type(scheduler).from_config(scheduler.config)


def _run_batches(images, masks, model, scheduler, *, vae, strength, steps, seed, round_index, indices, resample,
                 jump, class_labels, model_kwargs, batch_size, progress, desc):
    """:func:`_redenoise` over ``indices`` (positions in ``images``) in batches; returns the new images."""
    moves = len(jump_schedule(run_steps(steps, strength), jump, resample))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=moves * math.ceil(len(indices) / batch_size), desc=desc, leave=False)
    out = []
    try:
        for chunk in indices.split(batch_size):
            kwargs = dict(model_kwargs or {})
            if class_labels is not None:
                kwargs["class_labels"] = class_labels[chunk]
            gens = [torch.Generator().manual_seed(_seed(seed, round_index, int(k))) for k in chunk]
            out.append(_redenoise(images[chunk], masks[chunk], model, _fresh(scheduler), vae=vae, strength=strength,
                                  steps=steps, generators=gens, resample=resample, jump=jump, model_kwargs=kwargs,
                                  progress=bar))
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(out) if out else images[:0]


@torch.no_grad()
def sdedit(images: torch.Tensor, model, *, scheduler, strength: float = 0.5, steps: int = 50, seed: int = 0,
           vae=None, class_labels=None, model_kwargs: dict | None = None, batch_size: int = 64,
           progress: bool = True) -> torch.Tensor:
    """SDEdit (the unmasked baseline): every image noised to ``strength`` and denoised, (B, C, H, W) in [0, 1].

    The same loop and noise as :func:`repair_flaws` with a mask of ones, so the two differ only in the mask.
    """
    _check_images(images)
    _check_strength(strength)
    _check_int("steps", steps, 1)
    _check_int("batch_size", batch_size, 1)
    device = _device(model, images)
    x = images.to(device).float()
    labels = _check_labels(class_labels, len(x))
    ones = torch.ones(len(x), *x.shape[-2:], device=device)
    return _run_batches(x, ones, model, scheduler, vae=vae, strength=strength, steps=steps, seed=seed, round_index=0,
                        indices=torch.arange(len(x)), resample=1, jump=1, class_labels=labels,
                        model_kwargs=model_kwargs, batch_size=batch_size, progress=progress,
                        desc="sdedit").to(images.device)


@torch.no_grad()
def repair_flaws(
    images: torch.Tensor,
    model,
    highlighter=None,
    *,
    scheduler,
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
        model: the denoiser, called ``model(x_t, t, **model_kwargs)`` with ``t`` a 0-dim tensor: a
            diffusers UNet (``.sample`` of its output is used) or a plain callable returning the
            prediction ``scheduler`` expects (ε for the trainer's models). Runs on its parameters' device
            (the highlighter on its own).
        highlighter: a :class:`srdiff.FlawHighlighter` for C-channel images; masks come from
            ``highlighter.fam`` and flags from ``highlighter.predict`` (P(fake) >= ``flag_threshold``).
            Optional when ``masks`` is given and ``rounds == 1``.
        scheduler: a diffusers scheduler with ``add_noise``, ``set_timesteps`` and ``step`` (copied:
            the caller's is left as it was); the one the model was trained with (for the trainer's
            models ``make_scheduler(config, "ddim")``).
        threshold, threshold_mode, dilate, feather: the mask (:func:`flaw_masks`).
        strength: in (0, 1]: how far the masked region is noised (:func:`strength_timesteps`);
            ``steps``: the scheduler's step count for the whole schedule (``int(steps * strength)`` run).
        rounds: repeat the repair (new FAM, new mask, new noise) on the images the highlighter still
            flags, up to this many rounds.
        only_flagged: repair only images the highlighter flags (``False``: every image with a non-empty mask).
        resample, jump: RePaint's resampling (:func:`jump_schedule`); 1: none.
        seed: the noise of image i in round r comes from its own generator seeded by (seed, r, i):
            results do not depend on ``batch_size`` or the device's RNG.
        masks: (B, H, W) or (B, 1, H, W) in [0, 1] to use instead of the highlighter's (one round);
            every image with a non-empty mask is repaired, flagged or not.
        vae: for latent models: images are encoded (``latent_dist.mode()`` x ``scaling_factor``), the
            mask is brought to the latent grid (a cell's largest pixel value), composition runs in
            latent space, the result is decoded and pasted into the input through the pixel mask.
        class_labels: (B,) labels for class-conditional UNets (passed as ``class_labels=``).
        model_kwargs: more keyword arguments for the model (e.g. ``encoder_hidden_states``).

    Returns:
        ``(repaired, masks, report)``: repaired (B, C, H, W) in [0, 1] on ``images``' device, equal to
        ``images`` bit for bit wherever ``masks`` is 0; masks (B, H, W), the largest mask of any round
        (0 for images left alone); report, a dict with the settings, per-image records
        (``p_fake_before``/``after``, ``flagged_before``/``after``, ``rounds``, ``mask_area``,
        ``mean_abs_change``) and a summary.
    """
    _check_images(images)
    _check_strength(strength)
    _check_int("steps", steps, 1)
    _check_int("rounds", rounds, 1)
    _check_int("batch_size", batch_size, 1)
    jump_schedule(1, jump, resample)
    check_mask_args(threshold, threshold_mode, dilate, feather)
    if not isinstance(flag_threshold, (int, float)) or not 0.0 <= flag_threshold <= 1.0:
        raise ValueError(f"flag_threshold must be in [0, 1], got {flag_threshold!r}")
    if highlighter is None and (masks is None or rounds > 1):
        raise ValueError("a highlighter is needed unless masks are given and rounds == 1")
    if highlighter is not None and highlighter.in_channels != images.shape[1]:
        raise ValueError(f"the highlighter takes {highlighter.in_channels}-channel images, images have "
                         f"{images.shape[1]} channels (shape {tuple(images.shape)})")
    if masks is not None and rounds > 1:
        raise ValueError(f"given masks serve one round; rounds must be 1, got {rounds}")
    given = None if masks is None else check_masks(masks, images)
    device = _device(model, images)
    current = images.to(device, torch.float32, copy=True)  # never the caller's tensor: it is written in place
    labels = _check_labels(class_labels, len(current))
    if labels is not None:
        labels = labels.to(device)
    B = len(current)
    union = torch.zeros(B, *current.shape[-2:], device=device)
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
        current[active.to(device)] = _run_batches(
            current, m.new_zeros(B, *m.shape[1:]).index_copy(0, active.to(device), m), model, scheduler, vae=vae,
            strength=strength, steps=steps, seed=seed, round_index=r, indices=active, resample=resample, jump=jump,
            class_labels=labels, model_kwargs=model_kwargs, batch_size=batch_size, progress=progress,
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
                                   masks_given=given is not None, latent=vae is not None,
                                   scheduler=type(scheduler).__name__))
    return current.to(images.device), union.to(images.device), report


def _report(before, after, masks, p_before, p_after, flag_threshold, rounds_run, settings) -> dict:
    change = (after - before).abs()
    outside = (masks == 0)[:, None].expand_as(change)
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
