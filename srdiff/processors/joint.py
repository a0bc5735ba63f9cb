"""FAM processor for diffusers' ``JointAttnProcessor2_0`` (SD3 / SD3.5): image and text tokens
attend jointly; only image tokens carry a map value, text tokens get 0."""

import torch

from srdiff.processors.base import FAMProcessor, merge_heads, split_heads


class FAMJointAttnProcessor(FAMProcessor):
    """The modulated ``JointAttnProcessor2_0``.

    The image tokens (``hidden_states``, (B, N, C), N = the patch grid's cells) come first in the
    joint sequence and the text tokens (``encoder_hidden_states``) after them, as diffusers
    concatenates them; the per-key map is the resized M_emb for the image keys and 0 for the text
    keys (s = 1: text keys and values unchanged). Returns what ``JointAttnProcessor2_0`` returns:
    ``(image, text)`` with text tokens, the image tokens alone without (SD3.5's second attention).
    Unmodulated calls run the original processor unchanged. Arguments: see
    :class:`srdiff.FAMAttnProcessor`.
    """

    replaces = ("diffusers.models.attention_processor.JointAttnProcessor2_0",)

    @staticmethod
    def _heads(attn, x: torch.Tensor, to_q, to_k, to_v, norm_q, norm_k):
        q, k, v = (split_heads(proj(x), attn.heads) for proj in (to_q, to_k, to_v))
        return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        context = self.active()
        if context is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

        batch_size, n_image, _ = hidden_states.shape
        placement = self.placement(context, n_image - self.leading_tokens, batch_size)
        query, key, value = self._heads(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v,
                                        attn.norm_q, attn.norm_k)
        n_text = 0
        if encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
            text = self._heads(attn, encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                               attn.norm_added_q, attn.norm_added_k)
            query, key, value = (torch.cat([a, b], dim=2) for a, b in zip((query, key, value), text))

        fam = self.token_fam(context, placement, batch_size, n_tokens=n_image + n_text)
        hidden_states = merge_heads(self.attend(query, key, value, fam)).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :n_image], hidden_states[:, n_image:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states
