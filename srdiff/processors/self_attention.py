"""FAM processor for diffusers' ``AttnProcessor2_0`` layers (and the ``FusedAttnProcessor2_0``,
``AttnProcessor`` and ``SlicedAttnProcessor`` variants that compute the same attention): the
self-attention of UNet2DModel, UNet2DConditionModel (``attn1``), the video U-Nets' spatial layers, DiT,
PixArt, Latte."""

import torch

from srdiff.processors.base import FAMProcessor, from_tokens, merge_heads, split_heads, to_tokens


class FAMAttnProcessor(FAMProcessor):
    """A diffusers attention processor that modulates keys and values with the active mFAM.

    Inside a :func:`srdiff.fam_context` with a map and ``lam > 0``, a self-attention call runs
    :func:`srdiff.fam_attention` with ``fam = fam_to_tokens(M_emb, (h, w))``, (h, w) the layer's
    grid: a 4-d input's (height, width), or for (B, N, C) inputs the input grid of the model
    downsampled to N - ``leading_tokens`` cells. Everything else (no context, ``lam == 0``,
    cross-attention calls) is the processor it replaced, called unchanged (bit for bit).
    Cross-attention stays unmodulated: its keys are text tokens, which have no place in the image.

    Args:
        lam, projection, mode, backend, leading_tokens, name: see :class:`srdiff.processors.base.FAMLayer`.
        original: the processor it replaces (default ``AttnProcessor2_0()``); a
            ``FusedAttnProcessor2_0`` makes it project with the layer's fused ``to_qkv``; the non-2_0
            ``AttnProcessor`` and ``SlicedAttnProcessor`` (which ``set_default_attn_processor`` and
            ``set_attention_slice`` install) apply no ``norm_q``/``norm_k`` and scale the logits by
            ``attn.scale``, and so does their FAM version (the fused kernels need no slicing: their
            memory is O(N) anyway) (:class:`srdiff.processors.base.FAMProcessor`).

    With an ``attention_mask`` the modulated layer runs K/V prescaling + SDPA. Under
    ``torch.autocast`` the kernels run in the autocast dtype.
    """

    replaces = ("diffusers.models.attention_processor.AttnProcessor2_0",
                "diffusers.models.attention_processor.FusedAttnProcessor2_0",
                "diffusers.models.attention_processor.AttnProcessor",
                "diffusers.models.attention_processor.SlicedAttnProcessor")

    def __init__(self, lam: float = 0.025, *, original=None, **kwargs):
        super().__init__(lam, original=original, **kwargs)
        self.fused = self.family == "FusedAttnProcessor2_0"
        # the 2_0 processors normalise q and k and let SDPA scale by 1/sqrt(D); the others use attn.scale
        self.sdpa_like = self.family in ("AttnProcessor2_0", "FusedAttnProcessor2_0")

    def _project(self, attn, hidden_states: torch.Tensor):
        if self.fused:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs):
        context = self.active()
        if context is None or encoder_hidden_states is not None:
            return self.call_original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                      attention_mask=attention_mask, temb=temb, **kwargs)

        # AttnProcessor2_0's steps, with the modulated attention in place of SDPA.
        residual = hidden_states
        hidden_states, grid = to_tokens(attn, hidden_states, temb)
        batch_size, sequence_length, _ = hidden_states.shape
        placement = self.placement(context, sequence_length - self.leading_tokens, batch_size, grid)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = (split_heads(x, attn.heads) for x in self._project(attn, hidden_states))
        if self.sdpa_like and attn.norm_q is not None:
            query = attn.norm_q(query)
        if self.sdpa_like and attn.norm_k is not None:
            key = attn.norm_k(key)

        fam = self.token_fam(context, placement, batch_size)
        scale = None if self.sdpa_like else attn.scale
        hidden_states = merge_heads(self.attend(query, key, value, fam, attention_mask, scale)).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return from_tokens(attn, hidden_states, residual, grid)
