"""Text-guided emotive attention (paper §3.2.1): decoupled cross-attention over emotion text and face tokens.

The context is `[77 emotion-text tokens ; face tokens]`. One shared query attends to the text through the
original SD1.5 projections (`attn2.to_k/to_v`) and, separately, to the face tokens through their own
projections (`attn2.processor.to_k_ip.0/to_v_ip.0`, IP-Adapter style); the two head-merged results are
summed before the single output projection. Text padding positions stay visible (no key mask), as released.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from .attention import heads_attention, output_projection
from .diffusers_unet import cross_attentions


class DecoupledCrossAttnProcessor(nn.Module):
    """A diffusers attention processor; as an `nn.Module` its weights live at `attn2.processor.*`."""

    def __init__(self, hidden_size: int, context_dim: int, face_tokens: int = 4) -> None:
        super().__init__()
        self.face_tokens = face_tokens
        # ModuleList of one: the released key names carry the IP-Adapter group index (`to_k_ip.0`).
        self.to_k_ip = nn.ModuleList([nn.Linear(context_dim, hidden_size, bias=False)])
        self.to_v_ip = nn.ModuleList([nn.Linear(context_dim, hidden_size, bias=False)])

    def forward(self, attn: Attention, hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **_unused) -> torch.Tensor:
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] <= self.face_tokens:
            raise ValueError(f"the decoupled cross-attention needs a context of text tokens followed by "
                             f"{self.face_tokens} face tokens")
        if attention_mask is not None:
            raise ValueError("the decoupled cross-attention takes no attention mask (the release attends "
                             "to every text position)")
        text = encoder_hidden_states[:, : -self.face_tokens]
        face = encoder_hidden_states[:, -self.face_tokens:]
        query = attn.to_q(hidden_states)
        out = heads_attention(query, attn.to_k(text), attn.to_v(text), attn.heads)
        out = out + heads_attention(query, self.to_k_ip[0](face), self.to_v_ip[0](face), attn.heads)
        return output_projection(attn, out)


def install_decoupled_attention(unet: nn.Module, context_dim: int, face_tokens: int) -> None:
    """Give the cross-attention (`attn2`) of every spatial transformer block its decoupled processor."""
    for attn in cross_attentions(unet):
        attn.set_processor(DecoupledCrossAttnProcessor(attn.to_q.out_features, context_dim, face_tokens))
