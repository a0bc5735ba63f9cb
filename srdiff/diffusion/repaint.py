"""RePaint (Lugmayr et al. 2022), the one re-denoising loop with composition: flaw repair
(:func:`srdiff.repair_flaws`, any ``strength``), its unmasked baseline SDEdit (a mask of ones) and
``srdiff inpaint`` with an unconditional model (``strength=1``) all run :func:`repaint_images`.

The state starts as the input noised to the first timestep ``strength`` selects
(:func:`srdiff.diffusion.schedules.strength_timesteps`). Each denoising step runs the model and
``scheduler.step``, then composes (:func:`compose`): inside the mask the model's state, outside it the
input noised afresh to the new timestep. With ``resample`` r > 1, after every ``jump`` steps the state
is sent ``jump`` steps back up the chain (a draw of q(x_a | x_b)) and denoised again, r - 1 times
(:func:`jump_schedule`), so the fill harmonises with what is kept. At the end the pixels outside the
mask are the input's, bit for bit. Works with any denoiser (:mod:`srdiff.diffusion.denoiser`: a plain
model, or a trained srdiff model of any task through its own denoiser call), any diffusers scheduler
with ``add_noise``, ``set_timesteps`` and ``step`` (resampling: the one-step alpha-schedule ones, DDPM
and DDIM), in pixel space ([-1, 1]) or a VAE's latent space. Every image's noise comes from its own
generator (:func:`srdiff.diffusion.seeding.repaint_generators`), so results depend on neither the batch
size nor the device.

Follow a call: :func:`repaint_images` splits the images into batches, each with the ``predict`` its
denoiser's ``predictor(rows, images, masks)`` gives -> ``_redenoise`` (:func:`encode` to model space,
:func:`model_mask` to its grid) -> :func:`repaint` (:func:`strength_timesteps`, :func:`jump_schedule`;
per move ``predict`` + ``scheduler.step`` + :func:`compose`, or a q(x_a | x_b) draw + :func:`compose`)
-> :func:`decode` and the paste through the pixel mask.
"""

import inspect
import math

import torch
import torch.nn.functional as F

from srdiff._checks import check_int
from srdiff.diffusion.denoiser import Predictor
from srdiff.diffusion.sampling import decode, encode
from srdiff.diffusion.schedules import fresh_scheduler, run_steps, strength_timesteps
from srdiff.diffusion.seeding import per_image_randn, repaint_generators


def jump_schedule(n: int, jump: int, resample: int) -> list[int]:
    """RePaint's schedule over ``n`` denoising steps as index moves: +1 denoises one step, -k re-noises
    k steps. With ``resample`` r > 1, after every ``jump`` steps (except the last) the state is sent
    ``jump`` steps back and denoised again, r - 1 times: ``n * (1 + 2 * (r - 1))`` model calls at most
    (RePaint: jump 10, r 10). ``resample=1``: plain denoising, ``[+1] * n``."""
    check_int("jump", jump, 1)
    check_int("resample", resample, 1)
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


def compose(model_state: torch.Tensor, known_state: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask * model_state + (1 - mask) * known_state``, and exactly ``known_state`` where mask == 0.

    mask: (B, 1, h, w) in [0, 1], broadcast over channels."""
    return torch.where(mask > 0, torch.lerp(known_state, model_state, mask), known_state)


def _step_kwargs(scheduler, generators):
    params = inspect.signature(scheduler.step).parameters
    kwargs = {"generator": generators} if "generator" in params else {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    return kwargs


def _alpha_bar(scheduler, timesteps, index, device) -> torch.Tensor:
    if index == len(timesteps):
        return torch.tensor(1.0, device=device)
    return scheduler.alphas_cumprod[int(timesteps[index])].to(device=device, dtype=torch.float32)


def repaint(x0: torch.Tensor, mask: torch.Tensor, predict, scheduler, *, strength: float, steps: int,
            generators: list[torch.Generator], resample: int = 1, jump: int = 1, progress=None) -> torch.Tensor:
    """Re-denoise ``x0`` (B, c, h, w), in the model's space, inside ``mask`` (B, 1, h, w) in [0, 1].

    ``predict(x, t)``: the model's output (what ``scheduler`` expects) for the scaled state ``x`` at the
    0-dim timestep ``t``. ``generators``: one per image. ``progress``: a tqdm bar advanced per move.
    Returns the final state, (B, c, h, w), equal to ``x0`` wherever the mask is 0.
    """
    timesteps = strength_timesteps(scheduler, strength, steps)
    moves = jump_schedule(len(timesteps), jump, resample)
    if resample > 1 and (not hasattr(scheduler, "alphas_cumprod") or hasattr(scheduler, "sigmas")):
        raise ValueError(f"resample > 1 needs a one-step alpha-schedule scheduler (DDPM, DDIM), got "
                         f"{type(scheduler).__name__}")
    B = len(x0)
    device, shape = x0.device, x0.shape[1:]
    step_kwargs = _step_kwargs(scheduler, generators)

    def noised(index):
        if index == len(timesteps):
            return x0
        return scheduler.add_noise(x0, per_image_randn(generators, shape, device), timesteps[index].expand(B).to(device))

    x, i = noised(0), 0
    for move in moves:
        if move == 1:
            t = timesteps[i]
            pred = predict(scheduler.scale_model_input(x, t), t.to(device))
            x = scheduler.step(pred.to(x.dtype), t, x, **step_kwargs).prev_sample
            i += 1
            x = compose(x, noised(i), mask)
        else:
            a_from = _alpha_bar(scheduler, timesteps, i, device)
            i += move
            ratio = _alpha_bar(scheduler, timesteps, i, device) / a_from
            x = ratio.sqrt() * x + (1 - ratio).sqrt() * per_image_randn(generators, shape, device)
            x = compose(x, noised(i), mask)
        if progress is not None:
            progress.update(1)
    return x


def model_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """(B, 1, H, W) pixel mask -> (B, 1, h, w) on the model's grid: in a latent cell, the largest value of
    the pixels it covers (a cell changes if any of its pixels may)."""
    return mask if tuple(mask.shape[-2:]) == tuple(size) else F.adaptive_max_pool2d(mask, size)


def _redenoise(images, masks, predict, scheduler, *, vae, strength, steps, generators, resample, jump,
               progress) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1] re-denoised inside ``masks`` (B, 1, H, W); outside them exactly the input."""
    x0 = encode(images, vae)
    m = model_mask(masks, x0.shape[-2:]).to(x0.dtype)
    out = decode(repaint(x0, m, predict, scheduler, strength=strength, steps=steps, generators=generators,
                         resample=resample, jump=jump, progress=progress), vae)
    blended = out if vae is None else torch.lerp(images, out, masks)
    return torch.where(masks > 0, blended, images)


def repaint_images(images: torch.Tensor, masks: torch.Tensor, predictor: Predictor, scheduler, *, strength: float,
                   steps: int, seed: int, indices: torch.Tensor | None = None, round_index: int = 0,
                   resample: int = 1, jump: int = 1, vae=None, batch_size: int = 64, progress: bool = False,
                   desc: str = "RePaint") -> torch.Tensor:
    """RePaint ``images[indices]`` (B, C, H, W) in [0, 1] inside ``masks[indices]`` (B, 1, H, W) in [0, 1],
    1 = re-denoise, in batches; returns the new images (len(indices), C, H, W) in [0, 1], equal to the
    input bit for bit wherever the mask is 0.

    Args:
        predictor: ``predictor(rows, images, masks)`` gives the ``predict(x, t)`` of a batch: the model's
            output for the scaled state ``x`` at the 0-dim timestep ``t``, for the images ``rows``
            (positions in ``images``, to pick their conditions), given those images and their masks
            (:mod:`srdiff.diffusion.denoiser`).
        scheduler: a diffusers scheduler (copied per batch: the caller's is left as it was).
        strength, steps: :func:`srdiff.diffusion.schedules.strength_timesteps`.
        seed, round_index: image i's noise comes from ``repaint_generators(seed, round_index, [i])``.
        indices: the images to repaint (default all).
        resample, jump: :func:`jump_schedule`.
        vae: for latent models: the images are encoded, the mask is brought to the latent grid
            (:func:`model_mask`), composition runs there, the result is decoded and pasted into the
            input through the pixel mask.
    """
    indices = torch.arange(len(images)) if indices is None else indices
    check_int("batch_size", batch_size, 1)
    moves = len(jump_schedule(run_steps(steps, strength), jump, resample))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=moves * math.ceil(len(indices) / batch_size), desc=desc, leave=False)
    out = []
    try:
        for chunk in indices.split(batch_size):
            out.append(_redenoise(images[chunk], masks[chunk], predictor(chunk, images[chunk], masks[chunk]),
                                  fresh_scheduler(scheduler), vae=vae, strength=strength, steps=steps,
                                  generators=repaint_generators(seed, round_index, chunk), resample=resample,
                                  jump=jump, progress=bar))
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(out) if out else images[:0]
