"""Text-to-image: a ``UNet2DConditionModel`` reading caption embeddings of a frozen CLIP text encoder
through cross-attention (Rombach et al. 2022), on VAE latents (or on pixels when no VAE is given: the
tiny CPU case), with caption dropout for classifier-free guidance.

The text side is a local Stable Diffusion folder (``config.pretrained``: its UNet is fine-tuned, its VAE
and text encoder stay frozen) or tiny random parts (:mod:`srdiff.trainer.text_encoders`). Full
fine-tuning by default; ``config.lora_rank`` trains LoRA adapters instead (:mod:`srdiff.trainer.lora`).
Only self-attention carries the FAM modulation (the installer skips cross-attention: its keys are text).
Each unique caption is encoded once; the batch looks its embedding up.
"""

import json
import os
from pathlib import Path

import torch

from srdiff.diffusion.schedules import make_scheduler
from srdiff.diffusion.seeding import drop_conditions, per_image_choice
from srdiff.trainer import lora
from srdiff.trainer.backbones.base import Condition, DenoiserSpec
from srdiff.trainer.captions import train_captions
from srdiff.trainer.task import Batch, DenoisingTask, register_task
from srdiff.trainer.text_encoders import check_pretrained, pretrained_text_encoder, tiny_text_encoder


@register_task
class TextToImage(DenoisingTask):
    """Captions from ``metadata.jsonl`` (image folders) or generated for the digits; exports as
    ``StableDiffusionPipeline`` (latent models) or folders (pixel models, which no diffusers pipeline runs)."""

    name = "text"
    default_backbone = "unet-cond"
    condition = "text"

    def __init__(self, config, device):
        super().__init__(config, device)
        if "text" not in self.backbone.conditions:
            raise ValueError(f"task 'text' needs a backbone that reads caption embeddings ('unet-cond': "
                             f"cross-attention, 'sd3': joint attention), got {self.backbone_name!r}")
        self.encoder = None
        self.captions: list[str] = []  # the unique training captions
        self.caption_ids: torch.Tensor | None = None  # (N,) each training image's index into captions
        self.table: torch.Tensor | None = None  # (len(captions) + 1, L, D): their embeddings, then ""'s

    # ------------------------------------------------------------------ spec and state
    def setup(self, data) -> None:
        super().setup(data)
        per_image = train_captions(self.config, data)
        self.captions = list(dict.fromkeys(per_image))
        index = {c: i for i, c in enumerate(self.captions)}
        self.caption_ids = torch.tensor([index[c] for c in per_image], dtype=torch.long)
        self._build_encoder(None)
        self.spec = DenoiserSpec(**{**self.spec.to_dict(), "cross_attention_dim": self.encoder.width})

    def _build_encoder(self, tiny_state: dict | None) -> None:
        c = self.config
        if c.pretrained is not None:
            self.encoder = pretrained_text_encoder(c.pretrained, c.text_max_length)
        else:
            self.encoder = tiny_text_encoder(c.seed, c.text_max_length)
            if tiny_state is not None:
                self.encoder.model.load_state_dict(tiny_state)
        self.encoder.to(self.device)
        self.table = self.encoder([*self.captions, ""])

    def state_dict(self) -> dict:
        tiny = None if self.config.pretrained is not None else self.encoder.model.state_dict()
        return {**super().state_dict(), "captions": list(self.captions), "caption_ids": self.caption_ids,
                "text_encoder": tiny}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.captions, self.caption_ids = list(state["captions"]), state["caption_ids"]
        self._build_encoder(state["text_encoder"])

    def build_denoiser(self):
        c = self.config
        if c.pretrained is None:
            model = super().build_denoiser()
        else:
            model = self.backbone.from_pretrained(check_pretrained(c.pretrained, ("unet",)) / "unet")
            want = {"in_channels": self.spec.in_channels, "cross_attention_dim": self.spec.cross_attention_dim}
            for name, value in want.items():
                if model.config[name] != value:
                    raise ValueError(f"pretrained {c.pretrained!r}: unet has {name}={model.config[name]}, but the "
                                     f"vae and text encoder need {value}")
        return lora.add_lora(model, c.lora_rank) if c.lora_rank else model

    # ------------------------------------------------------------------ training
    def batch(self, indices: torch.Tensor, *, step: int, micro: int) -> Batch:
        """Images ``indices`` with their caption embeddings; each caption dropped to ``""`` with
        probability ``condition_dropout`` (keyed by (seed, step, micro))."""
        ids = drop_conditions(self.caption_ids[indices], len(self.captions), self.config.condition_dropout,
                              seed=self.config.seed, step=step, micro=micro)
        return Batch(x0=self.data.train_data[indices].to(self.device),
                     cond=Condition(encoder_hidden_states=self.table[ids.to(self.device)]))

    # ------------------------------------------------------------------ sampling
    def sample_conditions(self, indices: torch.Tensor, seed: int) -> Condition:
        """Image i gets the caption of a training image drawn by (seed, i): captions as often as in the data."""
        ids = self.caption_ids[per_image_choice(len(self.caption_ids), indices, seed)]
        return Condition(encoder_hidden_states=self.table[ids.to(self.device)])

    def prompt_condition(self, prompts: list[str]) -> Condition:
        """The condition that samples ``prompts`` (one per image)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of strings, got {prompts!r}")
        return Condition(encoder_hidden_states=self.encoder(list(prompts)))

    def null_condition(self, n: int) -> Condition:
        return Condition(encoder_hidden_states=self.table[-1:].expand(n, -1, -1))

    # ------------------------------------------------------------------ export
    def export(self, model, out_dir: str | os.PathLike) -> Path:
        """Latent models: a ``StableDiffusionPipeline`` folder (``from_pretrained`` loads it; no safety
        checker). With LoRA the adapters alone go to ``pytorch_lora_weights.safetensors``
        (``pipe.load_lora_weights(out_dir)``); on a ``pretrained`` base that file is all that is written
        besides ``srdiff_task.json``, which names the base folder. Pixel models (no VAE) and the ``sd3``
        backbone (diffusers' SD3 pipeline wants three text encoders): ``unet/`` (``transformer/``),
        ``text_encoder/``, ``tokenizer/``, ``scheduler/`` (``vae/``) folders and ``srdiff_task.json``."""
        import copy

        from diffusers import StableDiffusionPipeline

        c, out_dir = self.config, Path(out_dir)
        adapters = lora.has_lora(model)
        info = {"task": self.name, "guidance_scale": c.guidance_scale, "lora_rank": c.lora_rank,
                "pretrained": c.pretrained, "latent": self.vae is not None}
        if adapters:
            StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=lora.adapter_state_dict(model),
                                                      safe_serialization=True)
        if not (adapters and c.pretrained is not None):
            unet = (lora.base_copy(model) if adapters else self.backbone.plain_copy(model)).cpu()
            tokenizer = copy.deepcopy(self.encoder.tokenizer)
            tokenizer.model_max_length = self.encoder.max_length
            text_encoder = copy.deepcopy(self.encoder.model).cpu()
            pipe = self.backbone.pipeline(unet, c, condition="text",
                                          vae=None if self.vae is None else copy.deepcopy(self.vae).cpu(),
                                          text_encoder=text_encoder, tokenizer=tokenizer)
            if pipe is not None:
                pipe.save_pretrained(out_dir)
            else:
                vae = [("vae", self.vae)] if self.vae is not None else []
                for name, part in ((self.backbone.folder, unet), ("text_encoder", text_encoder),
                                   ("tokenizer", tokenizer), ("scheduler", make_scheduler(c, "ddim")), *vae):
                    part.save_pretrained(out_dir / name)
        (out_dir / "srdiff_task.json").write_text(json.dumps(info, indent=2) + "\n")
        return out_dir
