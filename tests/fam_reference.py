"""The independent references the FAM processor tests compare with, both the model with its original
processors and the keys and values of each named layer scaled per token by 1 + lam * (the map resized
bilinearly with F.interpolate to the layer's grid), i.e. the paper's K (1 + lam M), V (1 + lam M):

* :func:`prescaled`: forward hooks on the projections (keys after ``norm_k`` where the layer has one);
* :func:`scaled_attention`: at the attention call itself (after norms and rotary embeddings), with the
  image keys stated by the test (:class:`Keys`): independent of where any family keeps its keys.
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def halving_grid(n_tokens: int, input_hw: tuple[int, int]) -> tuple[int, int]:
    """The grid among the input's strided halvings (ceil(H / 2^k), ceil(W / 2^k)) with n_tokens cells."""
    (H, W), k = input_hw, 0
    while -(-H // 2 ** k) * -(-W // 2 ** k) > n_tokens:
        k += 1
    grid = (-(-H // 2 ** k), -(-W // 2 ** k))
    assert grid[0] * grid[1] == n_tokens, (n_tokens, input_hw)
    return grid


def token_scale(mfam: torch.Tensor, grid: tuple[int, int], lam: float, leading: int = 0) -> torch.Tensor:
    """(B|1, leading + h*w) s = 1 + lam * m, float32."""
    maps = mfam if mfam.dim() == 3 else mfam[None]
    m = F.interpolate(maps[:, None].float(), size=grid, mode="bilinear", align_corners=False).flatten(1)
    return 1 + lam * F.pad(m, (leading, 0))


def _scale(grid_of, mfam, lam, leading, token_dim):
    def hook(module, inputs, out):
        n = out.shape[token_dim]
        s = token_scale(mfam, grid_of(n - leading), lam, leading).to(out.dtype)
        return out * s.view(*s.shape[:1], *[1] * (token_dim - 1), n, *[1] * (out.dim() - token_dim - 1))

    return hook


@contextlib.contextmanager
def prescaled(model, names, mfam, lam, grid_of, leading: int = 0, key_token_dim: int | None = None):
    """Inside the block, the named layers of ``model`` (running their original processors) scale K
    and V; ``grid_of(n_spatial_tokens) -> (h, w)``. ``key_token_dim``: the token dim of the key
    output hooked (``norm_k``'s where the layer has one: 2 for (B, H, N, D), Attention's layout;
    Flux's is (B, N, H, D): 1)."""
    modules = dict(model.named_modules())
    hooks = []
    for name in names:
        attn = modules[name]
        norm_k = getattr(attn, "norm_k", None)
        key_out = attn.to_k if norm_k is None else norm_k
        token_dim = key_token_dim or (1 if norm_k is None else 2)
        hooks.append(key_out.register_forward_hook(_scale(grid_of, mfam, lam, leading, token_dim)))
        hooks.append(attn.to_v.register_forward_hook(_scale(grid_of, mfam, lam, leading, 1)))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def original_processors(model, names):
    """Inside the block the named layers run the processors their FAM processors replaced."""
    modules = dict(model.named_modules())
    saved = {n: modules[n].processor for n in names}
    for n in names:
        modules[n].processor = saved[n].original
    try:
        yield
    finally:
        for n in names:
            modules[n].processor = saved[n]


def checkpointing_gradients(model, mfam, forward, *, seed: int = 1):
    """Parameter gradients of ``forward(model).sample.square().sum()`` inside ``fam_context(mfam)``:
    ``(plain, checkpointed with backward inside the context, checkpointed with backward after it)``.
    ``seed`` is set before every forward (models that draw at random in training mode, e.g. DiT's label
    dropout). Enables gradient checkpointing on ``model``."""
    import srdiff

    def grads(backward_inside: bool) -> dict:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with srdiff.fam_context(mfam):
            loss = forward(model).sample.square().sum()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain = grads(True)
    model.enable_gradient_checkpointing()
    return plain, grads(True), grads(False)


# ---------------------------------------------------------------- the attention-level reference
# Independent of srdiff's hook path: K and V are scaled where attention consumes them (every
# torch.nn.functional.scaled_dot_product_attention call a named layer makes, after norms and rotary
# embeddings; diffusers' native backend calls it too), the image keys stated by the test.


@dataclass(frozen=True)
class Keys:
    """Where a layer's image keys lie, as a test states it: ``grid`` (h, w) or (f, h, w) of the image
    tokens (or a function of their count: U-Nets); ``text``: "none" (``leading`` non-image keys, then the
    image), "first" (text, then the image: per sample ``text_lengths`` long when given) or "last"
    (the image, then text/padding); ``frames``: video frames folded into the layer's batch."""

    grid: tuple | Callable[[int], tuple]
    text: str = "none"
    leading: int = 0
    frames: int = 1
    text_lengths: torch.Tensor | None = None

    def n_image(self, n_keys: int) -> int:
        if callable(self.grid):
            return n_keys - self.leading
        n = 1
        for g in self.grid:
            n *= g
        return n


def image_token_map(mfam: torch.Tensor, grid: tuple, frames: int = 1) -> torch.Tensor:
    """(B', n) the map at the image tokens: each frame's map resized bilinearly (F.interpolate) to the
    (h, w) grid, row-major; frame-major for an (f, h, w) grid; per-frame maps ((B, F, H, W)) spread over
    a (B * F)-batch when ``frames`` > 1, one map per video repeated over its frames."""
    h, w = grid[-2:]
    per_frame = mfam.dim() == 4
    maps = mfam.flatten(0, 1) if per_frame else (mfam if mfam.dim() == 3 else mfam[None])
    m = F.interpolate(maps[:, None].float(), size=(h, w), mode="bilinear", align_corners=False).flatten(1)
    if len(grid) == 3:
        f = grid[0]
        return m.reshape(mfam.shape[0], f * h * w) if per_frame else m.repeat(1, f)
    if frames > 1 and mfam.dim() == 3:
        m = m.repeat_interleave(frames, dim=0)
    return m


def key_scale(mfam: torch.Tensor, keys: Keys, lam: float, n_keys: int, batch: int) -> torch.Tensor:
    """(B|1, n_keys) s = 1 + lam * m over a layer's keys, float32."""
    n_image = keys.n_image(n_keys)
    grid = keys.grid(n_image) if callable(keys.grid) else keys.grid
    m = image_token_map(mfam, grid, keys.frames)
    if keys.text == "first" and keys.text_lengths is not None:
        index = torch.arange(n_keys)[None] - keys.text_lengths[:, None]
        inside = (index >= 0) & (index < n_image)
        m = torch.gather(m.expand(batch, -1), 1, index.clamp(0, n_image - 1)) * inside
    else:
        leading = n_keys - n_image if keys.text == "first" else keys.leading if keys.text == "none" else 0
        m = F.pad(m, (leading, n_keys - leading - n_image))
    return 1 + lam * m


@contextlib.contextmanager
def scaled_attention(model, keys: dict, mfam: torch.Tensor, lam: float):
    """Inside the block, every SDPA call the named layers of ``model`` make (``keys``: name -> Keys)
    sees its keys and values scaled by :func:`key_scale`; other calls are untouched."""
    modules = dict(model.named_modules())
    current, hooks = [], []
    sdpa = F.scaled_dot_product_attention

    def patched(query, key, value, *args, **kwargs):
        if current:
            s = key_scale(mfam, current[-1], lam, key.shape[-2], key.shape[0])
            s = s.view(s.shape[0], *[1] * (key.dim() - 3), key.shape[-2], 1)
            key, value = (torch.mul(x, s).to(x.dtype) for x in (key, value))
        return sdpa(query, key, value, *args, **kwargs)

    def enter(spec):
        def hook(module, args):
            current.append(spec)

        return hook

    def leave(module, args, output):
        current.pop()

    for name, spec in keys.items():
        hooks.append(modules[name].register_forward_pre_hook(enter(spec)))
        hooks.append(modules[name].register_forward_hook(leave, always_call=True))
    F.scaled_dot_product_attention = patched
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()


def assert_modulated(got: torch.Tensor, plain: torch.Tensor, reduce_dim: int) -> None:
    """The modulation moved the output by at least ten times the forward tolerance the reference
    comparison allows, so that comparison tells a modulated model from an unmodulated one."""
    from srdiff_testing import tolerance

    atol, rtol = tolerance(torch.float32, reduce_dim=reduce_dim)
    moved = ((got - plain).abs() / (atol + rtol * plain.abs())).max().item()
    assert moved > 10, f"the modulation moved the output by only {moved:.3g} x the comparison's tolerance"
