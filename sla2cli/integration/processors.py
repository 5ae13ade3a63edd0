"""SLA2 attention processors: what a converted self-attention module runs instead of its dense processor.

diffusers attention modules delegate their computation to a `processor`. A converted module gets one of
these: an nn.Module holding the layer's SLA2Attention (so its parameters travel with the model, and
train with it) plus the module's original dense processor. Each call re-does the family's projection,
q/k normalisation and rotary steps, then runs SLA2 for the attention itself. Calls that are not plain
self-attention (an attention mask, another sequence for keys and values, extra image keys) go to the
dense processor unchanged, so behaviour outside self-attention is exactly the model's own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sla2cli.integration.rope import rotate_pairs_cogvideox, rotate_pairs_wan
from sla2cli.module import SLA2Attention


def wan_self_attention_qkv(
    attn: nn.Module, hidden_states: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values (B, L, H, D) of a Wan self-attention module: projected, normed, rotated,
    exactly as diffusers' Wan processor feeds its attention."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        query = rotate_pairs_wan(query, *rotary_emb)
        key = rotate_pairs_wan(key, *rotary_emb)
    return query, key, value


class SLA2Processor(nn.Module):
    """Base: the layer's SLA2Attention and the dense processor for calls SLA2 does not cover.

    The dense processor is a stateless diffusers object (no parameters), kept outside the module tree.
    """

    def __init__(self, sla2: SLA2Attention, dense_processor: Any) -> None:
        super().__init__()
        self.sla2 = sla2
        self.dense_processor = dense_processor

    def extra_repr(self) -> str:
        return f"dense_fallback={type(self.dense_processor).__name__}"


class WanSLA2Processor(SLA2Processor):
    """For diffusers' WanAttention self-attention (attn1): projections, RMS q/k norm over all heads,
    interleaved 3D RoPE, SLA2, output projection."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # An explicit signature: diffusers inspects it to decide which keyword arguments to pass.
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            return self.dense_processor(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = wan_self_attention_qkv(attn, hidden_states, rotary_emb)
        out = self.sla2.forward_bshd(query, key, value).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class CogVideoXSLA2Processor(SLA2Processor):
    """For CogVideoX's joint attention (attn1): text and video tokens concatenated into one sequence.

    Without a mask every token attends to every token of the joint sequence, so queries and keys have
    the same length and SLA2 routes over it like any self-attention; the text tokens simply form the
    first query and key blocks. RoPE, when the model uses it, rotates the video tokens only.
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # An explicit signature: diffusers' Attention drops keyword arguments the processor does not name.
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None or encoder_hidden_states is None:
            return self.dense_processor(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=image_rotary_emb
            )
        text_length = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query = attn.to_q(joint).unflatten(2, (attn.heads, -1))
        key = attn.to_k(joint).unflatten(2, (attn.heads, -1))
        value = attn.to_v(joint).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = _rotate_video_tokens(query, text_length, image_rotary_emb)
            key = _rotate_video_tokens(key, text_length, image_rotary_emb)
        out = self.sla2.forward_bshd(query, key, value).flatten(2, 3)
        out = attn.to_out[1](attn.to_out[0](out))
        text_out, video_out = out.split([text_length, out.shape[1] - text_length], dim=1)
        return video_out, text_out


def _rotate_video_tokens(
    x: torch.Tensor, text_length: int, rotary_emb: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Apply CogVideoX RoPE to the tokens after the text prefix of a (B, L, H, D) tensor."""
    rotated = rotate_pairs_cogvideox(x[:, text_length:], *rotary_emb)
    return torch.cat([x[:, :text_length], rotated], dim=1)


PROCESSORS: dict[str, type[SLA2Processor]] = {
    "wan": WanSLA2Processor,
    "cogvideox": CogVideoXSLA2Processor,
}
