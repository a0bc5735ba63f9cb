"""Installing FAM modulation on a diffusers model, taking it off again, and looking at it.

:func:`set_fam_attn_processor` gives each self-attention layer one of two paths: the FAM version of
its processor where srdiff has one (:mod:`srdiff.processors.table`, the "fused" path), else forward
hooks on its key and value projections (:mod:`srdiff.processors.hooks`, the "hook" path, laid out by
:mod:`srdiff.processors.families`); a layer whose processor is in neither table is refused (or skipped
and reported). It registers the learned projections in the model and puts two hooks on the model:
before a forward they record the input's geometry (:mod:`srdiff.processors.inputs`), wrap the model's
gradient-checkpointing function (so recomputations replay the original forward's map), re-attach
hook-path layers whose projections changed (fused, peft-wrapped) and warn when a FAM processor has
been replaced since (``set_attention_slice``, ``fuse_qkv_projections``, ``set_attn_processor``);
after it they close the forward record and enforce ``fam_context(strict=True)``.
"""

import sys
import warnings
from collections.abc import Callable

import torch
from torch import nn

from srdiff.fam_embedding import FAMProjection
from srdiff.processors import context as fam_state
from srdiff.processors.base import FAMLayer, FAMLayerInfo
from srdiff.processors.context import ReplayingCheckpoint
from srdiff.processors.families import HOOK_LAYOUTS, REFUSED, input_spec, unmodulated_reason
from srdiff.processors.hooks import FAMHookLayer
from srdiff.processors.inputs import InputGeometry, read_input
from srdiff.processors.table import FAM_PROCESSORS, qualified_name

PROJECTIONS = ("per_layer", "shared")
PATHS = ("auto", "hook")
PROJECTION_ATTR = "fam_projection"
HOOK_ATTR = "_srdiff_fam_hook"
_INSTALLATION_ATTR = "_srdiff_fam"


class _Installation:
    """What one :func:`set_fam_attn_processor` call put on a model (kept on the model, so that
    ``copy.deepcopy`` (an EMA copy) carries a consistent one). ``layers``: name -> (attention module,
    how it is modulated: ``"processor"``, ``"hook"`` or ``"fam_layer"``, the FAM layer)."""

    def __init__(self, layers: dict[str, tuple[nn.Module, str, FAMLayer]], projection: str | None,
                 checkpointing: list[nn.Module]):
        self.layers, self.projection, self.checkpointing = layers, projection, checkpointing
        self.warned: set = set()

    def before_forward(self, geometry: InputGeometry) -> None:
        for module in self.checkpointing:
            func = getattr(module, "_gradient_checkpointing_func", None)
            if func is not None and not isinstance(func, ReplayingCheckpoint):
                module._gradient_checkpointing_func = ReplayingCheckpoint(func)
        replaced = {}
        for name, (module, attr, layer) in self.layers.items():
            layer.last_placement = None
            if attr == "hook":
                cls = qualified_name(type(module.processor))
                if cls == layer.processor_class:
                    layer.attach(module)
                else:
                    replaced[name] = type(module.processor).__name__
            elif getattr(module, attr) is not layer and not isinstance(getattr(module, attr), FAMLayer):
                replaced[name] = type(getattr(module, attr)).__name__
        context = fam_state.active_context()
        if context is None:
            return
        key = tuple(sorted(replaced.items()))
        if replaced and key not in self.warned:
            self.warned.add(key)
            classes = sorted(set(replaced.values()))
            warnings.warn(f"{len(replaced)} FAM layer(s) now run {', '.join(classes)} (replaced since "
                          f"set_fam_attn_processor, e.g. by set_attention_slice, fuse_qkv_projections or "
                          f"set_attn_processor) and are NOT modulated: {sorted(replaced)[:4]}...; call "
                          "srdiff.set_fam_attn_processor(model, ...) again", stacklevel=4)
        self.check_aspect(context, geometry)

    def check_aspect(self, context: "fam_state.FAMContext", geometry: InputGeometry) -> None:
        """Warn once per (map size, input size) whose aspect ratios differ. For packed tokens the grid's
        extent is on the device: read once per (map size, token count), never while compiling."""
        hw = context.grid or geometry.hw
        if hw is None and geometry.positions is not None and not torch.compiler.is_compiling():
            key = ("positions", tuple(context.mfam.shape[-2:]), tuple(geometry.positions.shape))
            if key not in self.warned:
                self.warned.add(key)
                from srdiff.processors.placement import Placement

                hw = Placement(positions=geometry.positions).describe()
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


def _before_forward(model: nn.Module, args: tuple, kwargs: dict):
    geometry = read_input(model, input_spec(model), args, kwargs)
    getattr(model, _INSTALLATION_ATTR).before_forward(geometry)
    fam_state.push_forward(geometry)


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


def _attention_layers(model: nn.Module):
    """(name, module) of every diffusers attention layer: the classic ``Attention``, the per-model
    classes of the newer API (``AttentionModuleMixin``: FluxAttention, WanAttention, ...), and others
    that carry a processor (MochiAttention)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    for name, module in model.named_modules():
        if isinstance(module, (Attention, AttentionModuleMixin)) or (
                hasattr(module, "processor") and hasattr(module, "to_k") and isinstance(module, nn.Module)):
            yield name, module


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
    path: str = "auto",
) -> list[str]:
    """Modulate the self-attention layers of a diffusers model with the active mFAM.

    Walks ``model.named_modules()`` for diffusers attention modules (so it works on models without
    ``set_attn_processor``, e.g. ``UNet2DModel``), leaves cross-attention layers, temporal and
    text-only attention (:data:`srdiff.processors.families.UNMODULATED_BLOCKS`, ``UNMODULATED_LAYERS``)
    and those ``layer_filter(name, module)`` rejects as they are, and gives every other one

    * the FAM version of its processor where srdiff has one (:data:`srdiff.processors.table.FAM_PROCESSORS`:
      ``AttnProcessor2_0`` and its fused, sliced, non-2_0 and PAG variants, SD3's joint attention,
      Flux, Flux.2, QwenImage, Sana's linear attention, HiDream, Lumina 2): the family's steps with the
      attention computed by :func:`srdiff.fam_attention` ("fused");
    * else, for every family :data:`srdiff.processors.families.HOOK_LAYOUTS` lays out, its own processor
      with forward hooks that scale its keys and values per image token ("hook": exact by construction);
    * else a ValueError naming the layer, its processor and, for families srdiff knows, the reason it is
      not modulated (``strict=False``: the layer is skipped and listed in a warning).

    On srdiff's own models (:class:`srdiff.UViT`) it re-sets the modulated blocks' lam, projection, mode
    and backend (their leading tokens are the model's). Calling it again replaces the earlier
    installation (same originals, same registered projections). :func:`srdiff.fam_layers` says which
    path each layer takes.

    Args:
        model: a diffusers model (``UNet2DModel``, ``UNet2DConditionModel``, ``DiTTransformer2DModel``,
            ``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ``WanTransformer3DModel``, ... see
            docs/processors.md).
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
        backend: passed to :func:`srdiff.fam_attention` by the FAM processors.
        leading_tokens: tokens before the image grid in every installed layer (time, class tokens),
            which get 0.
        strict: raise ValueError at a self-attention layer srdiff cannot modulate; False skips such
            layers with a warning that lists them.
        path: ``"auto"`` (the FAM processor where there is one, else the hook path) or ``"hook"`` (the
            hook path for every family it lays out: the reference the FAM processors are measured
            against).

    Returns:
        The names (as in ``named_modules``) of the layers it modulates, in model order.

    Example::

        >>> unet = diffusers.UNet2DModel(sample_size=64, ...)
        >>> srdiff.set_fam_attn_processor(unet, lam=0.025, projection="per_layer")
        ['down_blocks.1.attentions.0', 'mid_block.attentions.0', ...]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if layer_filter is not None and not callable(layer_filter):
        raise TypeError(f"layer_filter must be callable or None, got {type(layer_filter).__name__}")
    if not (projection is None or isinstance(projection, FAMProjection) or projection in PROJECTIONS):
        raise ValueError(f"projection must be None, 'per_layer', 'shared' or a FAMProjection, got {projection!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
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
    attention = dict(_attention_layers(model))
    for name, module in model.named_modules():
        if isinstance(getattr(module, "fam_layer", None), FAMLayer):  # srdiff's own FAM blocks (UViT)
            if layer_filter is None or layer_filter(name, module):
                chosen.append((module.fam_layer.fam_name, module, "fam_layer", None))
            continue
        if name not in attention or getattr(module, "is_cross_attention", False):
            continue
        if unmodulated_reason(model, name) is not None or (layer_filter is not None and not layer_filter(name, module)):
            continue
        cls = qualified_name(type(module.processor))
        fam_class = FAM_PROCESSORS.get(cls) if path == "auto" else None
        if fam_class is not None:
            chosen.append((name, module, "processor", fam_class))
        elif cls in HOOK_LAYOUTS:
            chosen.append((name, module, "hook", cls))
        elif strict:
            why = REFUSED.get(cls, "no layout is declared for it (srdiff.processors.families)")
            raise ValueError(f"layer {name!r} runs {cls}, which srdiff does not modulate: {why}; pass strict=False "
                             "to skip it (it then stays unmodulated), or layer_filter to leave it out")
        else:
            skipped[name] = cls.rsplit(".", 1)[-1]

    shared = _projection_for(model, "model") if projection == "shared" and chosen else None
    layers = {}
    for name, module, attr, family in chosen:
        if projection == "per_layer":
            layer_projection = _projection_for(module, f"layer {name!r}")
        else:
            layer_projection = shared if projection == "shared" else projection
        options = {"projection": layer_projection, "mode": mode, "name": name}
        if attr == "processor":
            layer = family(lam, original=module.processor, leading_tokens=leading_tokens, backend=backend, **options)
            module.set_processor(layer)
        elif attr == "hook":
            layer = FAMHookLayer(lam, processor_class=family, leading_tokens=leading_tokens, **options)
            layer.attach(module)
            setattr(module, HOOK_ATTR, layer)
        else:
            original = module.fam_layer
            layer = FAMLayer(lam, leading_tokens=original.leading_tokens, backend=backend, **options)
            layer.family, layer.original = original.family, original
            module.fam_layer = layer
        layer.projection_kind = mode_name or (None if projection is None else "external")
        layers[name] = (module, attr, layer)

    checkpointing = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    setattr(model, _INSTALLATION_ATTR, _Installation(layers, mode_name, checkpointing))
    model.register_forward_pre_hook(_before_forward, with_kwargs=True)
    model.register_forward_hook(_after_forward, always_call=True)
    if skipped:
        warnings.warn(f"set_fam_attn_processor(strict=False) skipped {len(skipped)} layer(s) it does not modulate; "
                      f"they stay unmodulated: {skipped}", stacklevel=2)
    if not layers:
        warnings.warn(f"set_fam_attn_processor: {type(model).__name__} has no self-attention layer it could "
                      "modulate; the model is unchanged", stacklevel=2)
    return list(layers)


def _uninstall(model: nn.Module, *, keep_projections: bool) -> list[str]:
    installation = getattr(model, _INSTALLATION_ATTR)
    restored = []
    for name, (module, attr, layer) in installation.layers.items():
        if attr == "hook":
            layer.detach()
            delattr(module, HOOK_ATTR)
            restored.append(name)
        elif getattr(module, attr) is layer:
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
    processor it had, hook-path layers lose their hooks, the model hooks and the checkpointing wrapper
    go, and the projections it registered (``fam_projection``) are deleted (save :func:`fam_parameters`
    first to keep them).

    Returns the names of the layers restored. Raises ValueError on a model without FAM processors.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _INSTALLATION_ATTR, None) is None:
        raise ValueError(f"{type(model).__name__} has no FAM processors installed (set_fam_attn_processor)")
    return _uninstall(model, keep_projections=False)


def _layer_objects(model: nn.Module):
    """FAM layers: diffusers layers' processors and hook layers, srdiff blocks' ``fam_layer`` (srdiff.UViT)."""
    for module in model.modules():
        for attr in ("processor", HOOK_ATTR, "fam_layer"):
            layer = getattr(module, attr, None)
            if isinstance(layer, FAMLayer):
                yield layer


def fam_layers(model: nn.Module) -> list[FAMLayerInfo]:
    """The model's FAM layers (processors, hook-path layers and srdiff's own FAM attention blocks), in
    model order: name, family, lam, projection kind, leading tokens, the token grid each modulated in
    the last forward (None where it was not modulated) and the path (``"fused"``, ``"hook"``,
    ``"block"``)."""
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
