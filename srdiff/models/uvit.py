"""A compact U-ViT (Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models", CVPR
2023, arXiv 2209.12152), the transformer backbone of the self-refining diffusion paper, on
:class:`srdiff.FAMAttention`.

Architecture (after the authors' public ``libs/uvit.py``, written anew): patch embedding (a p x p
convolution with stride p), the time step as a token (sinusoidal embedding + MLP), optionally the
class label as a token before it, learned position embeddings; ``depth // 2`` in-blocks, one
middle block, ``depth // 2`` out-blocks, each a pre-norm transformer block, the out-blocks taking
the matching in-block's output through a long skip (concatenate, then a linear layer); a final
norm, a linear decoder to p x p patches, unpatchify and a 3 x 3 convolution.

The modulation follows the authors' U-ViT code: inside :func:`srdiff.fam_context` the in- and
out-blocks scale their keys and values by 1 + lam * M_emb, M_emb the map resized bilinearly to the
patch grid, the leading time/class tokens 0; the middle block is never modulated. The authors use
no projection there; ``fam_projection="per_layer"`` or ``"shared"`` adds srdiff's
:class:`srdiff.FAMProjection` like on the diffusers models.

    model = srdiff.UViT(UViTConfig(sample_size=32, in_channels=3, num_classes=10))
    with srdiff.fam_context(mfam):
        eps = model(x_t, t, class_labels=y).sample            # called like a diffusers UNet
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn

from srdiff._checks import check_choice, check_int, check_lam, check_tensor
from srdiff.attention import FAMAttention
from srdiff.fam_embedding import FAMProjection
from srdiff.processors import context as fam_state
from srdiff.processors.base import FAMLayer, merge_heads, split_heads
from srdiff.processors.inputs import InputGeometry
from srdiff.processors.placement import Placement

PROJECTIONS = (None, "per_layer", "shared")
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


@dataclass(frozen=True)
class UViTConfig:
    """Everything that defines a :class:`UViT` (``asdict`` it to save it next to the state dict).

    sample_size: input height and width (an int: square); both divisible by ``patch_size``.
    in_channels / out_channels: image or latent channels (out defaults to in).
    width, depth, heads, mlp_ratio: token width, number of blocks besides the middle one (even:
    depth // 2 in-blocks, depth // 2 out-blocks), attention heads, MLP hidden width / width.
    num_classes: 0 for unconditional; otherwise a class token, with one extra "null" class used
    when ``class_labels`` is None (classifier-free guidance's unconditional branch).
    lam: the modulation strength of the in- and out-blocks (the paper's reverse lam: 0.025).
    fam_projection: None (the authors' U-ViT), "per_layer" or "shared".
    backend: passed to :func:`srdiff.fam_attention`.
    """

    sample_size: int | tuple[int, int] = 32
    in_channels: int = 3
    out_channels: int | None = None
    patch_size: int = 2
    width: int = 256
    depth: int = 12
    heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    num_classes: int = 0
    lam: float = 0.025
    fam_projection: str | None = None
    backend: str | None = field(default=None, compare=False)

    def __post_init__(self):
        for name in ("in_channels", "patch_size", "width", "heads"):
            check_int(name, getattr(self, name), 1)
        check_int("depth", self.depth, 2)
        if self.depth % 2:
            raise ValueError(f"depth must be an even int >= 2 (depth // 2 in- and out-blocks), got {self.depth!r}")
        if self.width % self.heads:
            raise ValueError(f"heads must divide width, got width={self.width}, heads={self.heads}")
        for h in self.hw:
            if not (isinstance(h, int) and h > 0 and h % self.patch_size == 0):
                raise ValueError(f"sample_size must be positive ints divisible by patch_size={self.patch_size}, "
                                 f"got {self.sample_size!r}")
        check_int("num_classes", self.num_classes, 0)
        check_lam(self.lam)
        check_choice("fam_projection", self.fam_projection, PROJECTIONS)

    @property
    def hw(self) -> tuple[int, int]:
        s = self.sample_size
        return (s, s) if isinstance(s, int) else tuple(s)

    @property
    def extra_tokens(self) -> int:
        return 1 + (self.num_classes > 0)


@dataclass
class UViTOutput:
    sample: torch.Tensor


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) time steps (any real values) -> (B, dim) [cos(t f_k), sin(t f_k)], f_k = max_period^(-k / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


class UViTBlock(nn.Module):
    """Pre-norm transformer block, optionally with a long-skip input: (B, N, C) -> (B, N, C)."""

    def __init__(self, config: UViTConfig, *, skip: bool):
        super().__init__()
        c = config.width
        self.skip_linear = nn.Linear(2 * c, c) if skip else None
        self.norm1 = nn.LayerNorm(c)
        self.attn = FAMAttention(c, config.heads, lam=config.lam, bias=config.qkv_bias, backend=config.backend)
        self.norm2 = nn.LayerNorm(c)
        hidden = int(c * config.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(c, hidden), nn.GELU(), nn.Linear(hidden, c))

    def _attention(self, x: torch.Tensor, fam: torch.Tensor | None, layer: FAMLayer | None) -> torch.Tensor:
        """Plain attention (``self.attn``) without a map; with one, ``self.attn``'s projections around
        ``layer.attend`` (the layer's lam and backend: what set_fam_attn_processor set)."""
        if fam is None:
            return self.attn(x)
        a = self.attn
        q, k, v = (split_heads(proj(x), a.heads) for proj in (a.to_q, a.to_k, a.to_v))
        return a.to_out(merge_heads(layer.attend(q, k, v, fam)))

    def forward(self, x: torch.Tensor, fam: torch.Tensor | None = None, skip: torch.Tensor | None = None,
                layer: FAMLayer | None = None):
        """x, skip (B, N, C); fam (N,) or (B, N) with ``layer`` the FAM layer it came from, or None."""
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self._attention(self.norm1(x), fam, layer)
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """See the module docstring. ``forward(sample, timestep, class_labels=None)``: sample (B, C, H, W)
    with (H, W) = ``config.sample_size``, timestep a scalar or (B,), class_labels (B,) ints or None;
    returns :class:`UViTOutput` with ``.sample`` (B, out_channels, H, W), like diffusers models.

    Save and load: ``model.save_pretrained(folder)`` / ``UViT.from_pretrained(folder)``, or the
    config and state dict yourself: ``UViT.from_config(asdict(model.config))`` then ``load_state_dict``.
    """

    def __init__(self, config: UViTConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = UViTConfig(**kwargs)
        elif kwargs:
            raise TypeError(f"pass a UViTConfig or keyword arguments, not both (got {sorted(kwargs)})")
        if not isinstance(config, UViTConfig):
            raise TypeError(f"config must be a UViTConfig, got {type(config).__name__}")
        self.config = config
        c, p = config.width, config.patch_size
        h, w = config.hw
        self.grid = (h // p, w // p)
        self.patch_embed = nn.Conv2d(config.in_channels, c, p, stride=p)
        self.time_embed = nn.Sequential(nn.Linear(c, 4 * c), nn.SiLU(), nn.Linear(4 * c, c))
        self.label_embed = nn.Embedding(config.num_classes + 1, c) if config.num_classes else None
        self.pos_embed = nn.Parameter(torch.zeros(1, config.extra_tokens + self.grid[0] * self.grid[1], c))
        self.in_blocks = nn.ModuleList(UViTBlock(config, skip=False) for _ in range(config.depth // 2))
        self.mid_block = UViTBlock(config, skip=False)
        self.out_blocks = nn.ModuleList(UViTBlock(config, skip=True) for _ in range(config.depth // 2))
        self.norm = nn.LayerNorm(c)
        out_channels = config.out_channels or config.in_channels
        self.decoder = nn.Linear(c, p * p * out_channels)
        self.final_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self._attach_fam_layers()

    @classmethod
    def from_config(cls, config: dict | UViTConfig) -> "UViT":
        return cls(config if isinstance(config, UViTConfig) else UViTConfig(**config))

    def save_pretrained(self, folder) -> None:
        """Write ``config.json`` and ``model.safetensors`` to ``folder`` (created; existing files of
        those names are replaced), as diffusers models do."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()}
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, folder) -> "UViT":
        """The model :meth:`save_pretrained` wrote to ``folder``."""
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} does not exist (written by UViT.save_pretrained)")
        config = json.loads((folder / CONFIG_NAME).read_text())
        if isinstance(config.get("sample_size"), list):
            config["sample_size"] = tuple(config["sample_size"])
        model = cls.from_config(config)
        model.load_state_dict(load_file(folder / WEIGHTS_NAME))
        return model

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _attach_fam_layers(self) -> None:
        """One :class:`FAMLayer` per in- and out-block (``block.fam_layer``), with its projection."""
        cfg = self.config
        if cfg.fam_projection == "shared":
            self.fam_projection = FAMProjection()
        for prefix, blocks in (("in_blocks", self.in_blocks), ("out_blocks", self.out_blocks)):
            for i, block in enumerate(blocks):
                if cfg.fam_projection == "per_layer":
                    block.fam_projection = FAMProjection()
                projection = getattr(block if cfg.fam_projection == "per_layer" else self, "fam_projection", None)
                block.fam_layer = FAMLayer(cfg.lam, projection=projection, backend=cfg.backend,
                                           leading_tokens=cfg.extra_tokens, name=f"{prefix}.{i}.attn")
                block.fam_layer.projection_kind = cfg.fam_projection
                block.fam_layer.family = "UViT"

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block in backward (the per-token maps are block inputs, so the
        recomputation is identical inside or outside the context)."""
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def _block(self, block: UViTBlock, x, skip=None):
        layer = getattr(block, "fam_layer", None)
        context = None if layer is None else layer.active()
        fam = None
        if context is not None:
            fam = layer.token_fam(context, Placement(grid=self.grid), x.shape[0])
        elif layer is not None:
            layer.last_placement = None
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, fam, skip, layer, use_reentrant=False)
        return block(x, fam, skip, layer)

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None) -> UViTOutput:
        check_tensor("sample", sample, ndim=4, floating=True)
        cfg = self.config
        B, _, H, W = sample.shape
        if (H, W) != cfg.hw or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample must be (B, {cfg.in_channels}, {cfg.hw[0]}, {cfg.hw[1]}), got "
                             f"{tuple(sample.shape)}")
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(B) if t.dim() == 0 else t
        x = self.patch_embed(sample).flatten(2).transpose(1, 2)
        tokens = [self.time_embed(timestep_embedding(t, cfg.width).to(x.dtype))[:, None], x]
        if self.label_embed is not None:
            if class_labels is None:
                class_labels = torch.full((B,), cfg.num_classes, device=sample.device, dtype=torch.long)
            tokens.insert(0, self.label_embed(class_labels)[:, None])
        elif class_labels is not None:
            raise ValueError("class_labels given but the model is unconditional (num_classes=0)")
        x = torch.cat(tokens, dim=1) + self.pos_embed

        record = fam_state.push_forward(InputGeometry(batch=B, hw=(H, W), patch_grid=self.grid))
        try:
            skips = []
            for block in self.in_blocks:
                x = self._block(block, x)
                skips.append(x)
            x = self._block(self.mid_block, x)
            for block in self.out_blocks:
                x = self._block(block, x, skips.pop())
        finally:
            fam_state.pop_forward(record)

        x = self.decoder(self.norm(x))[:, cfg.extra_tokens:]
        p, (gh, gw) = cfg.patch_size, self.grid
        out_channels = cfg.out_channels or cfg.in_channels
        x = x.reshape(B, gh, gw, p, p, out_channels).permute(0, 5, 1, 3, 2, 4).reshape(B, out_channels, H, W)
        return UViTOutput(self.final_conv(x))
