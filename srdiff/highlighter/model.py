"""The flaw highlighter: a real (0) / fake (1) classifier whose Grad-CAM maps of the fake logit are the
flaw activation maps (FAMs) that steer self-refining diffusion."""

import os
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from srdiff._checks import check_choice, check_int, check_tensor
from srdiff._io import load_file, save_atomic
from srdiff.gradcam import gradcam_reduce, minmax_normalize
from srdiff.highlighter import backbones
from srdiff.highlighter.images import resize_square

CHECKPOINT_FORMAT = "srdiff.FlawHighlighter/1"


class FlawHighlighter(nn.Module):
    """Real/fake image classifier (real = class 0, fake = class 1) with batched Grad-CAM flaw maps.

    Args:
        backbone: ``"small"`` (default; a plain CNN for 16-64 px images), ``"vgg16"`` or ``"vgg16_bn"``
            (torchvision's convolutional features, as in the paper), another torchvision
            classification model by name (e.g. ``"resnet18"``), or an ``nn.Module`` mapping
            (B, in_channels, S, S) normalised images to (B, 2) logits. Nothing is downloaded: built-in
            backbones start from random init (:meth:`load_backbone_weights` reads a local state dict).
        in_channels: 1 or 3. Backbones that want 3 channels (torchvision's) get grey images repeated.
        image_size: S, the side the network sees: every input is resized bilinearly to (S, S) and
            every map resized back to the input's own (H, W).
        target_layers: names of the Grad-CAM layers (``net.get_submodule`` paths); default the last
            convolutional stage (``["features.stage3"]`` for ``"small"``, ``["features.29"]``, the
            last ReLU, for ``"vgg16"``). With several layers the FAM is the mean of the per-layer
            maps, re-normalised, as in pytorch-grad-cam.
        width, stages: ``"small"`` only: channels of the first stage (doubling per stage), number of
            stages; the last stage runs at stride 2^(stages-1) (8x8 maps at 32 px with 3 stages).
        map_stride: VGG only: 16 (torchvision's layout: a 2x2 map at 32 px), 8 or 4 (the last pools
            dropped: 4x4 or 8x8 at 32 px). A map coarser than the flaws cannot point at them.
        head, pool: the built-in head (:class:`~srdiff.highlighter.backbones.Head`). Default
            ``"map"`` + ``"lse"``: a bias-free 1x1 convolution scores every position and a smooth
            maximum (log-mean-exp) pools the scores, so the FAM is the map of positive fake
            evidence, empty on an image with none. ``"linear"`` (a CAM network) and ``"mlp"`` (the
            authors' head, ``hidden`` units) on ``"avg"``/``"max"``/``"lse"``-pooled features are
            there for comparison: on planted artifacts they point much worse (docs/highlighter.md).
        dropout: before the head's last layer.
        mean, std: input normalisation, ``(x - mean) / std`` per channel (the authors' 0.45, 0.25).

    The network is ``self.net``; ``self(images)`` returns its (B, 2) logits.

    Example::

        >>> hl = FlawHighlighter(backbone="small", in_channels=1, image_size=32)
        >>> history = hl.fit(real, fake, epochs=20)            # (N, 1, H, W) in [0, 1], any H, W
        >>> fams = hl.fam(fake[:8])                             # (8, H, W) in [0, 1]
        >>> hl.save("highlighter.pt"); hl = FlawHighlighter.load("highlighter.pt")
    """

    def __init__(
        self,
        backbone: str | nn.Module = "small",
        *,
        in_channels: int = 3,
        image_size: int = 32,
        target_layers: Sequence[str] | None = None,
        width: int = 16,
        stages: int = 3,
        map_stride: int = 16,
        pool: str = "lse",
        head: str = "map",
        hidden: int = 512,
        dropout: float = 0.0,
        mean: float | Sequence[float] = 0.45,
        std: float | Sequence[float] = 0.25,
    ):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
        check_int("image_size", image_size, 8)
        check_choice("pool", pool, backbones.POOLS)
        check_choice("head", head, backbones.HEADS)
        check_choice("map_stride", map_stride, (16, 8, 4))
        check_int("width", width, 1)
        check_int("stages", stages, 1)
        self.in_channels, self.image_size = in_channels, image_size
        if isinstance(backbone, nn.Module):
            self.net, default_targets, self.backbone_name = backbone, [], "custom"
            self.net_channels = in_channels
        elif isinstance(backbone, str):
            self.net, default_targets = backbones.build(
                backbone, in_channels=in_channels, width=width, stages=stages, map_stride=map_stride,
                pool=pool, head=head, hidden=hidden, dropout=dropout,
            )
            self.backbone_name = backbone
            self.net_channels = in_channels if backbone == "small" else 3
        else:
            raise TypeError(f"backbone must be a name or an nn.Module, got {type(backbone).__name__}")
        targets = list(default_targets if target_layers is None else target_layers)
        if not targets:
            raise ValueError(f"target_layers must name at least one layer of backbone {self.backbone_name!r}")
        self.target_layers = targets
        for name in targets:
            self._target_module(name)
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() not in (1, in_channels) or std_t.numel() not in (1, in_channels) or not bool((std_t > 0).all()):
            raise ValueError(f"mean and std must be one value or {in_channels} values (std > 0), got {mean!r}, {std!r}")
        self.register_buffer("mean", mean_t.expand(in_channels).reshape(1, -1, 1, 1).clone(), persistent=False)
        self.register_buffer("std", std_t.expand(in_channels).reshape(1, -1, 1, 1).clone(), persistent=False)
        self._config = dict(
            backbone=self.backbone_name, in_channels=in_channels, image_size=image_size, target_layers=list(targets),
            width=width, stages=stages, map_stride=map_stride, pool=pool, head=head, hidden=hidden,
            dropout=dropout, mean=mean_t.tolist(), std=std_t.tolist(),
        )

    # ---------------------------------------------------------------- construction and persistence
    @property
    def config(self) -> dict:
        """The constructor arguments as primitives: ``FlawHighlighter.from_config(hl.config)`` rebuilds it."""
        return dict(self._config, target_layers=list(self._config["target_layers"]))

    @classmethod
    def from_config(cls, config: dict) -> "FlawHighlighter":
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        if config.get("backbone") == "custom":
            raise ValueError("config describes a custom nn.Module backbone: build FlawHighlighter(module, ...) "
                             "yourself and load_state_dict() the checkpoint's 'state_dict'")
        return cls(**config)

    def save(self, path: str | os.PathLike) -> None:
        """Write config and weights to ``path`` atomically (:func:`srdiff._io.save_atomic`)."""
        payload = {"format": CHECKPOINT_FORMAT, "config": self.config,
                   "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}
        save_atomic(payload, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location=None) -> "FlawHighlighter":
        """A highlighter written by :meth:`save` (read with ``weights_only=True``)."""
        payload = load_file(path, f"a FlawHighlighter checkpoint ({CHECKPOINT_FORMAT})", map_location)
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not a FlawHighlighter checkpoint ({CHECKPOINT_FORMAT})")
        hl = cls.from_config(payload["config"])
        hl.load_state_dict(payload["state_dict"])
        if map_location is not None:
            hl.to(map_location)
        return hl

    def load_backbone_weights(self, path: str | os.PathLike) -> None:
        """Load a local torchvision state dict (e.g. ImageNet VGG16) into the backbone's ``features``
        (built-in VGG) or the whole torchvision model, ignoring its classifier."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if self.backbone_name in ("vgg16", "vgg16_bn"):
            feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
            self.net.features.load_state_dict(feats)
        else:
            own = self.net.state_dict()
            keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
            self.net.load_state_dict(keep, strict=False)

    # ---------------------------------------------------------------- forward
    def _target_module(self, name: str) -> nn.Module:
        if not isinstance(name, str):
            raise TypeError(f"target layer names must be str, got {type(name).__name__}")
        try:
            return self.net.get_submodule(name)
        except AttributeError:
            raise ValueError(f"target layer {name!r} is not a submodule of the {self.backbone_name} backbone") from None

    def check_images(self, images, name: str = "images") -> None:
        """Raise ``TypeError``/``ValueError`` unless ``images`` is a float (B, in_channels, H, W) tensor."""
        check_tensor(name, images, ndim=4, floating=True)
        if images.shape[1] != self.in_channels:
            raise ValueError(f"{name} must have {self.in_channels} channels (B, C, H, W), got shape {tuple(images.shape)}")
        if images.shape[2] < 2 or images.shape[3] < 2:
            raise ValueError(f"{name} must be at least 2x2 pixels, got shape {tuple(images.shape)}")

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) in [0, 1] -> what the network sees: resized to (S, S), normalised,
        grey repeated to 3 channels where the backbone wants them; in the parameters' dtype."""
        param = next(self.parameters(), None)
        x = resize_square(images.to(param.dtype if param is not None else torch.float32), self.image_size)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if self.net_channels != self.in_channels:
            x = x.expand(-1, self.net_channels, -1, -1)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) in [0, 1] -> (B, 2) logits (real, fake)."""
        return self.net(self.prepare(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """P(fake) per image, (B,), in eval mode (the mode is restored afterwards)."""
        self.check_images(images)
        was_training = self.training
        self.eval()
        try:
            probs = [self(chunk).softmax(dim=1)[:, 1] for chunk in images.split(batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(probs) if probs else images.new_zeros(0)

    # ---------------------------------------------------------------- flaw activation maps
    def fam(self, images: torch.Tensor, *, mirror: bool = True, batch_size: int = 64) -> torch.Tensor:
        """Flaw activation maps: Grad-CAM of the fake logit at the target layer(s), one map per image.

        Args:
            images: (B, in_channels, H, W) floating, [0, 1], any H, W, on the model's device.
            mirror: also map each image's mirror image (flipped left-right) and return the geometric
                mean of the two maps (the second flipped back), min-max scaled. A classifier may put
                its evidence a few pixels beside the flaw, the same side in both orientations; the
                geometric mean peaks between the two, on the flaw (reduced-size planted runs: pointing
                0.16 -> 0.985 and 0.54 -> 0.89 in the worst cases, never more than 0.005 worse;
                docs/highlighter.md).
                Costs a second image per image. ``False``: exactly pytorch-grad-cam's ``GradCAM``.
            batch_size: images per forward/backward pass (memory bound, not a semantic choice).

        Returns:
            (B, H, W) float32 in [0, 1] on ``images``' device, at the images' own (H, W); (0, H, W) for
            an empty batch. Per layer the map is :func:`srdiff.gradcam_reduce`'s (ReLU of the
            gradient-weighted channel sum, min-max scaled, resized, scaled again); several layers are
            averaged and scaled again, as pytorch-grad-cam does with target class 1.

        The network runs in eval mode; each module's train/eval mode, every ``requires_grad`` flag
        and every parameter's ``.grad`` are as before the call. Gradients flow only to the target
        activations (``torch.autograd.grad``), also under ``torch.no_grad()``.
        """
        self.check_images(images)
        check_int("batch_size", batch_size, 1)
        B, _, H, W = images.shape
        if B == 0:
            return torch.zeros(0, H, W, device=images.device)
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with torch.enable_grad():
                return torch.cat([self._fam_chunk(chunk, (H, W), mirror) for chunk in images.split(batch_size)])
        finally:
            for m, mode in modes:
                m.training = mode

    def _fam_chunk(self, images: torch.Tensor, size: tuple[int, int], mirror: bool) -> torch.Tensor:
        if not mirror:
            return self._fam_batch(images, size)
        maps, mirrored = self._fam_batch(torch.cat([images, images.flip(-1)]), size).chunk(2)
        return minmax_normalize((maps * mirrored.flip(-1)).sqrt())

    def _fam_batch(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def keep(module, inputs, output):
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                raise ValueError(f"target layer output must be a (B, C, h, w) tensor, got "
                                 f"{tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__}")
            captured.append(output)

        # An input that requires grad gives the target activations a graph even when every parameter is frozen.
        x = images.detach().requires_grad_(True)
        handles = [self._target_module(name).register_forward_hook(keep) for name in self.target_layers]
        try:
            logits = self(x)
        finally:
            for h in handles:
                h.remove()
        if logits.dim() != 2 or logits.shape[1] != 2:
            raise ValueError(f"the network must return (B, 2) logits (real, fake), got shape {tuple(logits.shape)}")
        grads = torch.autograd.grad(logits[:, 1].sum(), captured)
        if len(captured) == 1:
            return gradcam_reduce(captured[0].detach(), grads[0], size)
        # pytorch-grad-cam's multi-layer aggregation: normalise each layer's map, resize, average, normalise.
        maps = [F.interpolate(gradcam_reduce(a.detach(), g)[:, None], size=size, mode="bilinear", align_corners=False)
                for a, g in zip(captured, grads)]
        return minmax_normalize(torch.cat(maps, dim=1).mean(dim=1))

    def mfam(self, images: torch.Tensor, *, mirror: bool = True, batch_size: int = 64) -> torch.Tensor:
        """The mean FAM of a batch, (H, W) in [0, 1]: where flaws tend to appear (see :meth:`fam`)."""
        self.check_images(images)
        if images.shape[0] == 0:
            raise ValueError("mfam needs at least one image, got an empty batch")
        return self.fam(images, mirror=mirror, batch_size=batch_size).mean(dim=0)

    def fit(self, real: torch.Tensor, fake: torch.Tensor, **kwargs) -> list[dict]:
        """Train on real (class 0) vs fake (class 1) images; see :func:`srdiff.highlighter.training.fit`."""
        from srdiff.highlighter.training import fit

        return fit(self, real, fake, **kwargs)
