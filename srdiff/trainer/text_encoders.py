"""The frozen text side of a text-to-image model: a CLIP tokenizer and text encoder, either from a local
Stable Diffusion folder (``pretrained``) or tiny and random-initialised (tests, the CPU demo).

A local Stable Diffusion folder is what ``StableDiffusionPipeline.save_pretrained`` writes: ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/`` (and ``scheduler/``, ...). Everything is read with
``from_pretrained`` from that folder; nothing is downloaded.

The tiny tokenizer is a CLIP byte-level BPE built here from a fixed vocabulary: every printable ASCII
character (alone and word-final) plus whole-word merges for the words of the generated digit captions,
so ``"a handwritten digit seven"`` is 4 tokens and any other text falls back to characters.
"""

import string
from pathlib import Path

import torch
from torch import nn

from srdiff.trainer.captions import DIGIT_WORDS

#: the parts of a local Stable Diffusion folder the text task reads
PRETRAINED_PARTS = ("unet", "vae", "text_encoder", "tokenizer")
#: the tiny random text encoder (CLIPTextModel) built when no ``pretrained`` folder is given
TINY_TEXT_ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=32, projection_dim=32)
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_TINY_WORDS = ("a", "handwritten", "digit", *DIGIT_WORDS)


def check_pretrained(path: str, parts: tuple[str, ...] = PRETRAINED_PARTS) -> Path:
    """``path`` as a Path if it is a folder holding every one of ``parts`` (each with its config), else
    ``ValueError`` naming ``pretrained`` and the first missing part."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"pretrained must be a local Stable Diffusion folder, got {path!r} (not a directory)")
    for part in parts:
        folder = root / part
        if not folder.is_dir() or not any(folder.iterdir()):
            raise ValueError(f"pretrained folder {path!r} has no {part!r} part (expected {folder}/ as "
                             f"StableDiffusionPipeline.save_pretrained writes it; needs {list(parts)})")
    return root


def tiny_tokenizer(max_length: int = TINY_TEXT_ENCODER["max_position_embeddings"]):
    """A CLIPTokenizer over printable ASCII with whole-word tokens for the digit captions (deterministic)."""
    from transformers import CLIPTokenizer

    chars = [c for c in string.printable if not c.isspace()]
    vocab = [*_SPECIALS, *chars, *(c + "</w>" for c in chars)]
    merges = []
    for word in _TINY_WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            if (parts[0], parts[1]) not in merges:
                merges.append((parts[0], parts[1]))
            if merged not in vocab:
                vocab.append(merged)
            parts = [merged, *parts[2:]]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=max_length)


class TextEncoder(nn.Module):
    """A frozen tokenizer + CLIPTextModel; :meth:`forward` maps captions to (B, L, D) hidden states
    (the last layer, as Stable Diffusion conditions on), each unique caption computed once and cached.

    ``max_length``: tokens per caption (padded and truncated), 0 for the tokenizer's ``model_max_length``.
    """

    def __init__(self, tokenizer, model: nn.Module, max_length: int = 0):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        limit = model.config.max_position_embeddings
        self.max_length = max_length or min(tokenizer.model_max_length, limit)
        if self.max_length > limit:
            raise ValueError(f"text_max_length must be <= the text encoder's {limit} positions, got {max_length}")
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def width(self) -> int:
        """D: the width of the hidden states (the denoiser's ``cross_attention_dim``)."""
        return self.model.config.hidden_size

    @torch.no_grad()
    def forward(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt").input_ids
            device = next(self.model.parameters()).device
            states = self.model(ids.to(device)).last_hidden_state
            self._cache.update(zip(missing, states))
        return torch.stack([self._cache[c] for c in captions])


def tiny_text_encoder(seed: int, max_length: int = 0) -> TextEncoder:
    """The tiny random CLIP text encoder (:data:`TINY_TEXT_ENCODER`), initialised from ``seed`` without
    touching the global random state."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            **TINY_TEXT_ENCODER)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    return TextEncoder(tokenizer, model, max_length)


def pretrained_text_encoder(path: str, max_length: int = 0) -> TextEncoder:
    """The tokenizer and text encoder of the local Stable Diffusion folder ``path``."""
    from transformers import CLIPTextModel, CLIPTokenizer

    root = check_pretrained(path, ("text_encoder", "tokenizer"))
    return TextEncoder(CLIPTokenizer.from_pretrained(root / "tokenizer"),
                       CLIPTextModel.from_pretrained(root / "text_encoder"), max_length)
