"""FAM processor for Lumina-Image 2.0's ``Lumina2AttnProcessor2_0`` (``Lumina2Transformer2DModel``):
grouped-query self-attention. The noise refiner sees the image tokens alone; the joint layers see each
sample's caption (its own length: prompts are padded, the image follows the valid tokens) then the
image, then padding; the context refiner sees text alone and is never modulated. The model hook reads
the caption lengths from ``encoder_attention_mask``."""

import math

import torch

from srdiff.processors.base import FAMProcessor


class FAMLumina2AttnProcessor(FAMProcessor):
    """The modulated ``Lumina2AttnProcessor2_0`` (projections, QK norms, rotary embedding, proportional
    attention scale, grouped K/V heads and the key mask as there). Unmodulated calls run the original
    unchanged. Arguments: see :class:`srdiff.FAMAttnProcessor`."""

    replaces = ("diffusers.models.transformers.transformer_lumina2.Lumina2AttnProcessor2_0",)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None,
                 base_sequence_length: int | None = None):
        context = self.active()
        if context is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                 base_sequence_length)
        from diffusers.models.embeddings import apply_rotary_emb

        batch, n_tokens, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = query.shape[-1] // attn.heads
        kv_heads = key.shape[-1] // head_dim
        dtype = query.dtype
        query = query.view(batch, -1, attn.heads, head_dim)
        key, value = (x.view(batch, -1, kv_heads, head_dim) for x in (key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=False)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=False)
        query, key = query.to(dtype), key.to(dtype)
        scale = attn.scale
        if base_sequence_length is not None:
            scale = math.sqrt(math.log(n_tokens, base_sequence_length)) * attn.scale
        repeat = attn.heads // kv_heads
        if repeat >= 1:
            key, value = (x.unsqueeze(3).repeat(1, 1, 1, repeat, 1).flatten(2, 3) for x in (key, value))
        if attention_mask is not None:
            attention_mask = attention_mask.bool().view(batch, 1, 1, -1)

        fam = self.text_and_image_fam(context, key.shape[1], batch)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        hidden_states = self.attend(q, k, v, fam, attention_mask, scale)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden_states))
