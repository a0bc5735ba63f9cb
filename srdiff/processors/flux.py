"""FAM processor for Flux's ``FluxAttnProcessor`` (``FluxTransformer2DModel``): packed image tokens,
text tokens first. Dual-stream blocks get the text as ``encoder_hidden_states``; single-stream
blocks see ``[text, image]`` already concatenated. Either way the text tokens get 0 and the image
tokens the map at their positions, which the model hook takes from ``img_ids`` (rows and columns in its
columns 1 and 2, on the device) or ``fam_context(mfam, grid=(h, w))`` gives."""

import torch

from srdiff.processors.base import FAMProcessor


def rotate_qk(query: torch.Tensor, key: torch.Tensor, image_rotary_emb) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux's rotary embedding on (B, N, H, D) queries and keys (none: unchanged)."""
    from diffusers.models.embeddings import apply_rotary_emb

    if image_rotary_emb is None:
        return query, key
    return (apply_rotary_emb(query, image_rotary_emb, sequence_dim=1),
            apply_rotary_emb(key, image_rotary_emb, sequence_dim=1))


class FAMFluxAttnProcessor(FAMProcessor):
    """The modulated ``FluxAttnProcessor`` (projections, RMS norms and rotary embeddings as there, the
    attention by :func:`srdiff.fam_attention`). Unmodulated calls run the original unchanged.
    Arguments: see :class:`srdiff.FAMAttnProcessor`."""

    replaces = ("diffusers.models.transformers.transformer_flux.FluxAttnProcessor",)

    @staticmethod
    def projections(attn, hidden_states, encoder_hidden_states):
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        return _get_qkv_projections(attn, hidden_states, encoder_hidden_states)

    @staticmethod
    def outputs(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
        """The attention output split into image and text and projected out (single-stream blocks
        project outside the attention)."""
        if encoder_hidden_states is None:
            return hidden_states
        n_enc = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states[:, :n_enc], hidden_states[:, n_enc:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        context = self.active()
        if context is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value, text_query, text_key, text_value = self.projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            text_query, text_key, text_value = (x.unflatten(-1, (-1, attn.head_dim))
                                                for x in (text_query, text_key, text_value))
            text_query, text_key = attn.norm_added_q(text_query), attn.norm_added_k(text_key)
            query, key, value = (torch.cat([a, b], dim=1) for a, b in
                                 zip((text_query, text_key, text_value), (query, key, value)))
        query, key = rotate_qk(query, key, image_rotary_emb)

        fam = self.text_and_image_fam(context, key.shape[1], query.shape[0])
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        hidden_states = self.attend(q, k, v, fam, attention_mask).transpose(1, 2).flatten(2, 3).to(query.dtype)
        return self.outputs(attn, hidden_states, encoder_hidden_states)
