"""FAM processor for Sana's linear attention (``SanaLinearAttnProcessor2_0``,
``SanaTransformer2DModel``'s self-attention): ReLU-kernel attention whose keys and values are scaled
inside the feature map by :func:`srdiff.fam_linear_attention`."""

import torch

from srdiff.linear_attention import fam_linear_attention
from srdiff.processors.base import FAMProcessor, split_heads


class FAMSanaLinearAttnProcessor(FAMProcessor):
    """The modulated ``SanaLinearAttnProcessor2_0`` (projections and QK norms as there, float32 inside,
    fp16 outputs clipped as there). Unmodulated calls run the original unchanged. Arguments: see
    :class:`srdiff.FAMAttnProcessor` (``backend`` does not apply: the linear attention has one path)."""

    replaces = ("diffusers.models.attention_processor.SanaLinearAttnProcessor2_0",)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None):
        context = self.active()
        if context is None or encoder_hidden_states is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask)
        dtype = hidden_states.dtype
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        batch, n_tokens, _ = hidden_states.shape
        fam = self.image_fam(context, n_tokens - self.leading_tokens, batch)
        q, k, v = (split_heads(x, attn.heads) for x in (query, key, value))
        out = fam_linear_attention(q, k, v, fam, self.lam, check_fam=False)
        hidden_states = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2).to(dtype)))
        return hidden_states.clip(-65504, 65504) if dtype == torch.float16 else hidden_states
