"""FAM processor for diffusers' perturbed-attention guidance self-attention
(``PAGIdentitySelfAttnProcessor2_0``, ``PAGCFGIdentitySelfAttnProcessor2_0``): the batch is
[original | perturbed] (with CFG [uncond | cond | perturbed]); the original part runs attention, the
perturbed part identity attention (each query's output is its own value).

Modulated, both parts see V scaled by s (the keys enter only the original part's attention): the
original part gets :func:`srdiff.fam_attention`, the perturbed part s * V, exactly what the hook path
(K and V scaled at the projections, the processor unchanged) computes. A per-image map is indexed
with the model's batch: its first rows go to the original part, its last ones to the perturbed.
"""

import torch

from srdiff.processors.base import FAMProcessor, from_tokens, merge_heads, split_heads, to_tokens


class FAMPAGAttnProcessor(FAMProcessor):
    """The modulated PAG identity self-attention processors; like them it applies no ``norm_q`` and
    ``norm_k``. Arguments: see :class:`srdiff.FAMAttnProcessor`."""

    replaces = ("diffusers.models.attention_processor.PAGIdentitySelfAttnProcessor2_0",
                "diffusers.models.attention_processor.PAGCFGIdentitySelfAttnProcessor2_0")

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None):
        context = self.active()
        if context is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

        residual = hidden_states
        hidden_states, grid = to_tokens(attn, hidden_states, temb)
        batch, n_tokens, _ = hidden_states.shape
        parts = 3 if self.family == "PAGCFGIdentitySelfAttnProcessor2_0" else 2
        n_org = batch // parts * (parts - 1)
        placement = self.placement(context, n_tokens - self.leading_tokens, batch, grid)
        fam = self.token_fam(context, placement, batch)
        fam_org, fam_ptb = (fam, fam) if fam.dim() == 1 else (fam[:n_org], fam[n_org:])
        org, ptb = hidden_states[:n_org], hidden_states[n_org:]

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, n_tokens, n_org)
            attention_mask = attention_mask.view(n_org, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            org = attn.group_norm(org.transpose(1, 2)).transpose(1, 2)
            ptb = attn.group_norm(ptb.transpose(1, 2)).transpose(1, 2)
        query, key, value = (split_heads(proj(org), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        org = merge_heads(self.attend(query, key, value, fam_org, attention_mask)).to(query.dtype)
        s = 1.0 + self.lam * fam_ptb.float()
        ptb = torch.mul(attn.to_v(ptb), s[..., None]).to(query.dtype)

        out = torch.cat([attn.to_out[1](attn.to_out[0](x)) for x in (org, ptb)])
        return from_tokens(attn, out, residual, grid)
