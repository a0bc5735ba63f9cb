"""Installing FAM processors on a diffusers model, taking them off again, and looking at them.

:func:`set_fam_attn_processor` replaces each self-attention layer's processor by the FAM version
the table (:mod:`srdiff.processors.table`) names for it, registers the learned projections in the
model, and puts two hooks on the model: before a forward they record the input's (H, W), wrap the
model's gradient-checkpointing function (so recomputations replay the original forward's map) and
warn when a FAM processor has been replaced since (``set_attention_slice``,
``fuse_qkv_projections``, ``set_attn_processor``); after it they close the forward record and
enforce ``fam_context(strict=True)``.
"""

import sys
import warnings
from collections.abc import Callable

import torch
from torch import nn

from srdiff.fam_embedding import FAMProjection
from srdiff.processors import context as fam_state
from srdiff.processors.context import ReplayingCheckpoint
from srdiff.processors.base import FAMLayer, FAMLayerInfo
from srdiff.processors.table import FAM_PROCESSORS, fam_processor_for, qualified_name

PROJECTIONS = ("per_layer", "shared")
PROJECTION_ATTR = "fam_projection"
_INSTALLATION_ATTR = "_srdiff_fam"
_INPUT_NAMES = ("sample", "hidden_states", "x")


class _Installation:
    """What one :func:`set_fam_attn_processor` call put on a model (kept on the model, so that
    ``copy.deepcopy`` (an EMA copy) carries a consistent one)."""

    def __init__(self, layers: dict[str, tuple[nn.Module, str, FAMLayer]], projection: str | None,
                 checkpointing: list[nn.Module]):
        self.layers, self.projection, self.checkpointing = layers, projection, checkpointing
        self.warned: set = set()

    def before_forward(self, input_hw: tuple[int, int] | None) -> None:
        for module in self.checkpointing:
            func = getattr(module, "_gradient_checkpointing_func", None)
            if func is not None and not isinstance(func, ReplayingCheckpoint):
                module._gradient_checkpointing_func = ReplayingCheckpoint(func)
        for _, _, layer in self.layers.values():
            layer.last_grid = None
        context = fam_state.active_context()
        if context is None:
            return
        replaced = {name: type(getattr(module, attr)).__name__ for name, (module, attr, layer) in self.layers.items()
                    if getattr(module, attr) is not layer and not isinstance(getattr(module, attr), FAMLayer)}
        key = tuple(sorted(replaced.items()))
        if replaced and key not in self.warned:
            self.warned.add(key)
            classes = sorted(set(replaced.values()))
            warnings.warn(f"{len(replaced)} FAM layer(s) now run {', '.join(classes)} (replaced since "
                          f"set_fam_attn_processor, e.g. by set_attention_slice, fuse_qkv_projections or "
                          f"set_attn_processor) and are NOT modulated: {sorted(replaced)[:4]}...; call "
                          "srdiff.set_fam_attn_processor(model, ...) again", stacklevel=4)
        hw = context.grid or input_hw
        if hw is not None:
            fam_state.warn_on_aspect_mismatch(context.mfam, hw)

    def after_forward(self, record: fam_state.ForwardRecord) -> None:
        context = fam_state.active_context()
        if context is None or record.modulated:
            return
        if context.strict:
            raise RuntimeError("fam_context(strict=True): the model's forward modulated no attention layer "
                               f"(FAM layers: {list(self.layers)[:4]}...)")
        if any(layer.lam > 0 for _, _, layer in self.layers.values()) and "nothing modulated" not in self.warned:
            self.warned.add("nothing modulated")
            warnings.warn("a forward inside fam_context with a map modulated no attention layer of this model "
                          "(see srdiff.fam_layers(model))", stacklevel=3)


def _input_hw(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """The input's (H, W): a 4-d sample's, or for packed tokens (Flux) the grid that ``img_ids``
    (N, 3) spans (rows and columns in columns 1 and 2: one device sync)."""
    sample = args[0] if args else next((kwargs[n] for n in _INPUT_NAMES if n in kwargs), None)
    if isinstance(sample, torch.Tensor) and sample.dim() == 4:
        return tuple(sample.shape[-2:])
    img_ids = kwargs.get("img_ids")
    if isinstance(img_ids, torch.Tensor) and img_ids.shape[-1] == 3:
        ids = img_ids.reshape(-1, 3)[:, 1:].amax(dim=0)
        return int(ids[0]) + 1, int(ids[1]) + 1
    return None


def _before_forward(model: nn.Module, args: tuple, kwargs: dict):
    input_hw = _input_hw(args, kwargs)
    getattr(model, _INSTALLATION_ATTR).before_forward(input_hw)
    fam_state.push_forward(input_hw)


def _after_forward(model: nn.Module, args: tuple, output):
    record = fam_state.current_forward()
    if record is None:
        return
    fam_state.pop_forward(record)
    if sys.exc_info()[1] is None:  # torch also runs this hook when the forward raised: no checks then
        getattr(model, _INSTALLATION_ATTR).after_forward(record)


def _param_like(module: nn.Module) -> dict:
    p = next(module.parameters(), None)
    return {} if p is None else {"device": p.device, "dtype": p.dtype}


def _registered_projections(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, FAMProjection)
            and name.rsplit(".", 1)[-1] == PROJECTION_ATTR]


def _projection_for(owner: nn.Module, where: str) -> FAMProjection:
    """``owner.fam_projection``, created (identity-initialised, on owner's device and dtype) if absent."""
    existing = getattr(owner, PROJECTION_ATTR, None)
    if existing is None:
        owner.add_module(PROJECTION_ATTR, FAMProjection().to(**_param_like(owner)))
    elif not isinstance(existing, FAMProjection):
        raise ValueError(f"{where} already has an attribute {PROJECTION_ATTR!r} ({type(existing).__name__}); "
                         "srdiff registers its FAM projections under that name")
    return getattr(owner, PROJECTION_ATTR)


def set_fam_attn_processor(
    model: nn.Module,
    lam: float = 0.025,
    *,
    layer_filter: Callable[[str, nn.Module], bool] | None = None,
    projection: str | FAMProjection | None = None,
    mode: str = "bilinear",
    backend: str | None = None,
    leading_tokens: int = 0,
    strict: bool = True,
) -> list[str]:
    """Install FAM processors on the self-attention layers of a diffusers model.

    Walks ``model.named_modules()`` for diffusers attention modules (so it works on models without
    ``set_attn_processor``, e.g. ``UNet2DModel``), leaves cross-attention layers and those
    ``layer_filter(name, module)`` rejects as they are, and gives every other one the FAM processor
    that :data:`srdiff.processors.table.FAM_PROCESSORS` names for its current processor
    (``AttnProcessor2_0``, ``FusedAttnProcessor2_0``: :class:`srdiff.FAMAttnProcessor`;
    ``JointAttnProcessor2_0``: :class:`srdiff.FAMJointAttnProcessor`). On srdiff's own models
    (:class:`srdiff.UViT`) it re-sets the modulated blocks' lam, projection, mode and backend (their
    leading tokens are the model's). Calling it again replaces the earlier installation (same
    originals, same registered projections).

    Args:
        model: a diffusers model (``UNet2DModel``, ``UNet2DConditionModel``, ``DiTTransformer2DModel``,
            ``PixArtTransformer2DModel``, ``SD3Transformer2DModel``, ...).
        lam: modulation strength (the paper: 0.025).
        layer_filter: ``(name, module) -> bool``; default: every self-attention layer (the authors
            modulate every U-Net attention block).
        projection: the learned M_emb (:class:`srdiff.FAMProjection`): None (the map itself, default),
            ``"per_layer"`` (one per attention layer, as in the authors' ADM code, registered as
            ``<layer>.fam_projection``), ``"shared"`` (one, registered as ``model.fam_projection``,
            run once per forward) or a FAMProjection you own (shared, not registered: optimise and
            save it yourself). Registered ones are in ``model.parameters()`` and ``state_dict()``;
            :func:`srdiff.fam_parameters` lists them.
        mode: ``"bilinear"`` or ``"area"`` (how the map is resized to each layer's grid).
        backend: passed to :func:`srdiff.fam_attention`.
        leading_tokens: tokens before the image grid in every installed layer (time, class tokens),
            which get 0.
        strict: raise ValueError at a self-attention layer whose processor has no FAM version;
            False skips such layers with a warning that lists them.

    Returns:
        The names (as in ``named_modules``) of the layers that got a FAM processor, in model order.

    Example::

        >>> unet = diffusers.UNet2DModel(sample_size=64, ...)
        >>> srdiff.set_fam_attn_processor(unet, lam=0.025, projection="per_layer")
        ['down_blocks.1.attentions.0', 'mid_block.attentions.0', ...]
    """
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if layer_filter is not None and not callable(layer_filter):
        raise TypeError(f"layer_filter must be callable or None, got {type(layer_filter).__name__}")
    if not (projection is None or isinstance(projection, FAMProjection) or projection in PROJECTIONS):
        raise ValueError(f"projection must be None, 'per_layer', 'shared' or a FAMProjection, got {projection!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    mode_name = projection if isinstance(projection, str) else None
    registered = _registered_projections(model)
    previous = getattr(model, _INSTALLATION_ATTR, None)
    # srdiff's own models (UViT) may declare their projections in their config
    declared = previous.projection if previous else getattr(getattr(model, "config", None), "fam_projection", None)
    if registered and declared != mode_name:
        raise ValueError(f"model holds FAM projections {registered[:3]} from an earlier projection="
                         f"{declared!r} install; pass that again, or "
                         "call srdiff.remove_fam_attn_processor(model) first (it deletes them)")
    # Validates lam, mode, leading_tokens before anything changes.
    FAMLayer(lam, mode=mode, backend=backend, leading_tokens=leading_tokens)
    if previous is not None:
        _uninstall(model, keep_projections=True)

    chosen, skipped = [], {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "fam_layer", None), FAMLayer):  # srdiff's own FAM blocks (UViT)
            if layer_filter is None or layer_filter(name, module):
                chosen.append((module.fam_layer.fam_name, module, "fam_layer", None))
            continue
        # Attention: the classic layers; AttentionModuleMixin: the newer per-model ones (FluxAttention, ...)
        if not isinstance(module, (Attention, AttentionModuleMixin)) or getattr(module, "is_cross_attention", False):
            continue
        if layer_filter is not None and not layer_filter(name, module):
            continue
        fam_class = fam_processor_for(module.processor)
        if fam_class is None:
            cls = qualified_name(type(module.processor))
            if strict:
                raise ValueError(
                    f"layer {name!r} runs {cls}, which srdiff has no FAM processor for (known: "
                    f"{sorted(k.rsplit('.', 1)[-1] for k in FAM_PROCESSORS)}); pass strict=False to skip it "
                    "(it then stays unmodulated), or layer_filter to leave it out"
                )
            skipped[name] = cls.rsplit(".", 1)[-1]
            continue
        chosen.append((name, module, "processor", fam_class))

    shared = _projection_for(model, "model") if projection == "shared" and chosen else None
    layers = {}
    for name, module, attr, fam_class in chosen:
        if projection == "per_layer":
            layer_projection = _projection_for(module, f"layer {name!r}")
        else:
            layer_projection = shared if projection == "shared" else projection
        options = {"projection": layer_projection, "mode": mode, "backend": backend, "name": name}
        if attr == "processor":
            layer = fam_class(lam, original=module.processor, leading_tokens=leading_tokens, **options)
            module.set_processor(layer)
        else:
            original = module.fam_layer
            layer = FAMLayer(lam, leading_tokens=original.leading_tokens, **options)
            layer.family, layer.original = original.family, original
            module.fam_layer = layer
        layer.projection_kind = mode_name or (None if projection is None else "external")
        layers[name] = (module, attr, layer)

    checkpointing = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    setattr(model, _INSTALLATION_ATTR, _Installation(layers, mode_name, checkpointing))
    model.register_forward_pre_hook(_before_forward, with_kwargs=True)
    model.register_forward_hook(_after_forward, always_call=True)
    if skipped:
        warnings.warn(f"set_fam_attn_processor(strict=False) skipped {len(skipped)} layer(s) it has no FAM "
                      f"processor for; they stay unmodulated: {skipped}", stacklevel=2)
    if not layers:
        warnings.warn(f"set_fam_attn_processor: {type(model).__name__} has no self-attention layer it could "
                      "modulate; the model is unchanged", stacklevel=2)
    return list(layers)


def _uninstall(model: nn.Module, *, keep_projections: bool) -> list[str]:
    installation = getattr(model, _INSTALLATION_ATTR)
    restored = []
    for name, (module, attr, layer) in installation.layers.items():
        if getattr(module, attr) is layer:
            if attr == "processor":
                module.set_processor(layer.original)
            else:
                setattr(module, attr, layer.original)
            restored.append(name)
    for module in installation.checkpointing:
        func = getattr(module, "_gradient_checkpointing_func", None)
        if isinstance(func, ReplayingCheckpoint):
            module._gradient_checkpointing_func = func.inner
    for hooks, fn in ((model._forward_pre_hooks, _before_forward), (model._forward_hooks, _after_forward)):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    if not keep_projections and getattr(getattr(model, "config", None), "fam_projection", None) is None:
        for name in _registered_projections(model):
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            delattr(owner, PROJECTION_ATTR)
    delattr(model, _INSTALLATION_ATTR)
    return restored


def remove_fam_attn_processor(model: nn.Module) -> list[str]:
    """Undo :func:`set_fam_attn_processor`: every layer still running its FAM processor gets back the
    processor it had, the hooks and the checkpointing wrapper go, and the projections it
    registered (``fam_projection``) are deleted (save :func:`fam_parameters` first to keep them).

    Returns the names of the layers restored. Raises ValueError on a model without FAM processors.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _INSTALLATION_ATTR, None) is None:
        raise ValueError(f"{type(model).__name__} has no FAM processors installed (set_fam_attn_processor)")
    return _uninstall(model, keep_projections=False)


def _layer_objects(model: nn.Module):
    """FAM layers: diffusers layers' processors and srdiff blocks' ``fam_layer`` (srdiff.UViT)."""
    for module in model.modules():
        for attr in ("processor", "fam_layer"):
            layer = getattr(module, attr, None)
            if isinstance(layer, FAMLayer):
                yield layer


def fam_layers(model: nn.Module) -> list[FAMLayerInfo]:
    """The model's FAM layers (processors and srdiff's own FAM attention blocks), in model order: name,
    family, lam, projection kind, leading tokens, and the token grid each modulated in the last
    forward (None where it was not modulated)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [layer.info() for layer in _layer_objects(model)]


def fam_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every :class:`srdiff.FAMProjection` the model's FAM layers use (registered in
    the model or passed in), each once: e.g. for their own optimiser group or learning rate."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    projections = [m for m in model.modules() if isinstance(m, FAMProjection)]
    projections += [layer.projection for layer in _layer_objects(model) if layer.projection is not None]
    seen, params = set(), []
    for proj in projections:
        for p in proj.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params
