"""FAM processors for Flux.2 (``Flux2Transformer2DModel``): the dual-stream ``Flux2AttnProcessor`` (image
and text projected apart, attending as [text, image]) and the single-stream
``Flux2ParallelSelfAttnProcessor`` (one projection of [text, image] into q, k, v and the MLP input).
Text tokens get 0; image tokens the map at their positions, read by the model hook from ``img_ids``
((B, N, 4): t, row, col, l; reference images of other ``t`` get 0)."""

import torch

from srdiff.processors.base import FAMProcessor
from srdiff.processors.flux import FAMFluxAttnProcessor, rotate_qk


class FAMFlux2AttnProcessor(FAMFluxAttnProcessor):
    """The modulated ``Flux2AttnProcessor``: Flux's steps with Flux.2's projections, and the output
    projection applied in every block. Unmodulated calls run the original unchanged. Arguments: see
    :class:`srdiff.FAMAttnProcessor`."""

    replaces = ("diffusers.models.transformers.transformer_flux2.Flux2AttnProcessor",)

    @staticmethod
    def projections(attn, hidden_states, encoder_hidden_states):
        from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections

        return _get_qkv_projections(attn, hidden_states, encoder_hidden_states)

    @staticmethod
    def outputs(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](hidden_states))
        return FAMFluxAttnProcessor.outputs(attn, hidden_states, encoder_hidden_states)


class FAMFlux2ParallelSelfAttnProcessor(FAMProcessor):
    """The modulated ``Flux2ParallelSelfAttnProcessor`` (the fused q, k, v and MLP projection, its MLP
    half unchanged). Unmodulated calls run the original unchanged. Arguments: see
    :class:`srdiff.FAMAttnProcessor`."""

    replaces = ("diffusers.models.transformers.transformer_flux2.Flux2ParallelSelfAttnProcessor",)

    def __call__(self, attn, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None):
        context = self.active()
        if context is None:
            return self.original(attn, hidden_states, attention_mask, image_rotary_emb)
        projected = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = projected.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(projected, [local_qkv, projected.shape[-1] - local_qkv], dim=-1)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key = rotate_qk(query, key, image_rotary_emb)

        fam = self.text_and_image_fam(context, key.shape[1], query.shape[0])
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        hidden_states = self.attend(q, k, v, fam, attention_mask).transpose(1, 2).flatten(2, 3).to(query.dtype)
        hidden_states = torch.cat([hidden_states, attn.mlp_act_fn(mlp_hidden_states)], dim=-1)
        return attn.to_out(hidden_states)
