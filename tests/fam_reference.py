"""The independent reference the FAM processor tests compare with: the model with its original
processors and forward hooks that scale each named layer's keys and values per token by
1 + lam * (the map resized bilinearly with F.interpolate to the layer's grid), i.e. the paper's
K (1 + lam M), V (1 + lam M). Keys are scaled after ``norm_k`` where the layer has one (the key that
enters attention)."""

import contextlib

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
