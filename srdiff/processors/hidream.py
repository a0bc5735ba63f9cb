"""FAM processor for HiDream-I1's ``HiDreamAttnProcessor`` (``HiDreamImageTransformer2DModel``): image
and text streams with their own projections and RMS norms attending as [image, text] in dual-stream
blocks; single-stream blocks get [image, text] already concatenated. Image tokens come first (padded to
the model's maximum length for non-square inputs: the padding, masked by HiDream, gets 0, as the text)."""

import torch

from srdiff.processors.base import FAMProcessor


class FAMHiDreamAttnProcessor(FAMProcessor):
    """The modulated ``HiDreamAttnProcessor`` (projections, RMS norms, the padding mask on the keys and
    the rotary embedding as there). Unmodulated calls run the original unchanged. Arguments: see
    :class:`srdiff.FAMAttnProcessor`."""

    replaces = ("diffusers.models.transformers.transformer_hidream_image.HiDreamAttnProcessor",)

    def __call__(self, attn, hidden_states: torch.Tensor, hidden_states_masks: torch.Tensor | None = None,
                 encoder_hidden_states: torch.Tensor | None = None, image_rotary_emb: torch.Tensor = None,
                 *args, **kwargs):
        context = self.active()
        if context is None:
            return self.original(attn, hidden_states, hidden_states_masks, encoder_hidden_states, image_rotary_emb,
                                 *args, **kwargs)
        from diffusers.models.transformers.transformer_hidream_image import apply_rope

        dtype, batch = hidden_states.dtype, hidden_states.shape[0]
        head_dim = attn.inner_dim // attn.heads

        def heads(x):
            return x.view(batch, -1, attn.heads, head_dim)

        query = heads(attn.q_rms_norm(attn.to_q(hidden_states)).to(dtype=dtype))
        key = heads(attn.k_rms_norm(attn.to_k(hidden_states)).to(dtype=dtype))
        value = heads(attn.to_v(hidden_states))
        if hidden_states_masks is not None:
            key = key * hidden_states_masks.view(batch, -1, 1, 1)
        n_image = query.shape[1]
        if not attn.single:
            text = (heads(attn.q_rms_norm_t(attn.to_q_t(encoder_hidden_states)).to(dtype=dtype)),
                    heads(attn.k_rms_norm_t(attn.to_k_t(encoder_hidden_states)).to(dtype=dtype)),
                    heads(attn.to_v_t(encoder_hidden_states)))
            query, key, value = (torch.cat([a, b], dim=1) for a, b in zip((query, key, value), text))
        if query.shape[-1] == image_rotary_emb.shape[-3] * 2:
            query, key = apply_rope(query, key, image_rotary_emb)
        else:  # the rotary embedding covers the first half of each head
            (query_1, query_2), (key_1, key_2) = query.chunk(2, dim=-1), key.chunk(2, dim=-1)
            query_1, key_1 = apply_rope(query_1, key_1, image_rotary_emb)
            query, key = torch.cat([query_1, query_2], dim=-1), torch.cat([key_1, key_2], dim=-1)

        fam = self.text_and_image_fam(context, key.shape[1], batch, text_first=False)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        hidden_states = self.attend(q, k, v, fam).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if attn.single:
            return attn.to_out(hidden_states)
        image_out, text_out = hidden_states[:, :n_image], hidden_states[:, n_image:]
        return attn.to_out(image_out), attn.to_out_t(text_out)
