"""FAM processor for QwenImage's ``QwenDoubleStreamAttnProcessor2_0``: text and image streams with their
own projections and norms, attending jointly as [text, image]. The image stream holds the generated
image's packed tokens first (edit models append reference images after them); the model hook reads
their grid from ``img_shapes``. Text and reference-image tokens get 0."""

import torch

from srdiff.processors.base import FAMProcessor


class FAMQwenDoubleStreamAttnProcessor(FAMProcessor):
    """The modulated ``QwenDoubleStreamAttnProcessor2_0`` (projections, QK norms, rotary embeddings and
    the joint text mask as there; the attention by :func:`srdiff.fam_attention`, with the mask by its
    prescaled path). Unmodulated calls run the original unchanged. Arguments: see
    :class:`srdiff.FAMAttnProcessor`."""

    replaces = ("diffusers.models.transformers.transformer_qwenimage.QwenDoubleStreamAttnProcessor2_0",)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 encoder_hidden_states_mask: torch.Tensor = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None):
        context = self.active()
        if context is None or encoder_hidden_states is None or attention_mask is not None:
            # the original raises on a missing text stream or an external mask
            return self.original(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                 attention_mask, image_rotary_emb)
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        batch, n_image = hidden_states.shape[:2]
        n_text = encoder_hidden_states.shape[1]
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones((batch, n_image), dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        head_dim = attn.inner_dim // attn.heads
        streams = []
        for x, projections, norms in (
                (encoder_hidden_states, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                 (attn.norm_added_q, attn.norm_added_k)),
                (hidden_states, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))):
            q, k, v = (proj(x).unflatten(-1, (-1, head_dim)) for proj in projections)
            q = q if norms[0] is None else norms[0](q)
            k = k if norms[1] is None else norms[1](k)
            streams.append([q, k, v])
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            for stream, freqs in zip(streams, (txt_freqs, img_freqs)):
                stream[0], stream[1] = (apply_rotary_emb_qwen(t, freqs, use_real=False) for t in stream[:2])
        query, key, value = (torch.cat([text, image], dim=1) for text, image in zip(*streams))

        fam = self.text_and_image_fam(context, n_image, batch, text_first=False)
        fam = torch.nn.functional.pad(fam, (n_text, 0))
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        joint = self.attend(q, k, v, fam, attention_mask).transpose(1, 2).flatten(2, 3).to(query.dtype)
        text_out, image_out = joint[:, :n_text], joint[:, n_text:]
        image_out = attn.to_out[0](image_out.contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)
        return image_out, attn.to_add_out(text_out.contiguous())
