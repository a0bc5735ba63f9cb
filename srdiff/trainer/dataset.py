"""The run's images: a reproducible train/held-out split of ``config.data``, and in latent mode the VAE and
the training latents."""

from dataclasses import dataclass

import torch
from torch import nn

from srdiff import data as srdata
from srdiff.labels import load_labelled


@dataclass
class Dataset:
    train_images: torch.Tensor  # (N, C, H, W) in [0, 1]
    holdout_images: torch.Tensor  # (M, C, H, W) in [0, 1], for evaluation only
    train_labels: torch.Tensor | None  # (N,) class labels where the data has them (srdiff.labels)
    holdout_labels: torch.Tensor | None
    train_data: torch.Tensor  # what the UNet is trained on: images in [-1, 1], or scaled VAE latents
    vae: nn.Module | None
    class_names: list[str] | None = None  # class index -> name, where the labels name their classes


def load_vae(path: str, device: torch.device, channels: int) -> nn.Module:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path).to(device).eval().requires_grad_(False)
    if vae.config.in_channels != channels:
        raise ValueError(f"vae at {path!r} takes {vae.config.in_channels} channels but channels={channels}")
    return vae


def latent_shape(vae: nn.Module, image_size: int) -> tuple[int, int]:
    """(latent channels, latent side) of ``vae`` for square images of ``image_size``; ``ValueError`` where the
    VAE's downsampling does not divide ``image_size`` (its decoder would not give the size back)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        below = image_size - image_size % factor
        raise ValueError(f"image_size {image_size} does not fit the VAE: it downsamples {factor}x, so image_size "
                         f"must be a multiple of {factor}; {' or '.join(str(s) for s in (below, below + factor) if s >= 8)} "
                         "would")
    return vae.config.latent_channels, image_size // factor


def load_dataset(config, device: torch.device) -> Dataset:
    images, labels, class_names = load_labelled(config.data, config.image_size, config.channels, config.labels)
    try:
        train_idx, hold_idx = srdata.split(torch.arange(len(images)), config.holdout, seed=config.split_seed)
    except ValueError as exc:
        raise ValueError(f"data {config.data!r}: {exc}") from None
    train = images[train_idx]
    vae = None
    if config.vae is not None:
        vae = load_vae(config.vae, device, config.channels)
        latent_shape(vae, config.image_size)
        with torch.no_grad():
            latents = [vae.encode(b.to(device) * 2 - 1).latent_dist.mode() for b in train.split(256)]
        train_data = (torch.cat(latents) * vae.config.scaling_factor).cpu()
    else:
        train_data = train * 2 - 1
    return Dataset(
        train_images=train,
        holdout_images=images[hold_idx],
        train_labels=labels[train_idx] if labels is not None else None,
        holdout_labels=labels[hold_idx] if labels is not None else None,
        train_data=train_data,
        vae=vae,
        class_names=class_names,
    )
