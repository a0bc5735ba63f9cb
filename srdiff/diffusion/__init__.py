"""Diffusion tools below both the flaw repair and the trainer; they import neither.

:mod:`.schedules` (the diffusers scheduler of a config, the timesteps of a ``strength``),
:mod:`.seeding` (every keyed seed rule), :mod:`.masks` (the one mask convention and its checker, random
holes, mask files), :mod:`.sampling` (the DDIM/DDPM loop, classifier-free guidance, pixel/latent space)
:mod:`.repaint` (the one RePaint: ``strength``, jumps, resamplings, composition) and :mod:`.denoiser` (a
model as RePaint calls it: a plain one, or a trained one of any task through its own call). See
docs/architecture.md.
"""
