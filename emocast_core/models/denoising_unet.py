"""The denoising 3D UNet: SD1.5 run over the frames of a clip, reading the ReferenceNet's bank, with the
emotive audio attention and an AnimateDiff motion module after every spatial transformer.

Released behaviour reproduced unconditionally (docs/release_quirks.md §2): the weights were trained with the
"gradient-checkpointing" code path, in which the motion modules of the attention-free blocks
(`down_blocks.3`, `up_blocks.0`) never run, every motion module sees the motion-frame features in front
of the clip, and the `[pose, face, lip]` weights reach the audio attention. Those five motion modules are
kept as parameters so the checkpoint loads strictly.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import NetConfig
from .emotive_audio_attention import EmotiveAudioModule
from .motion_module import MotionModule
from .diffusers_unet import (DENOISING_PARTS, adopt_parts, build_sd_unet, has_attention, plain_self_attention,
                             spatial_layer, spatial_transformer, time_embedding, unet_body)
from .reference_attention import ReferenceReader
from .text_guided_emotive_attention import install_decoupled_attention


@dataclass
class AudioAttentionInputs:
    """Per-frame inputs of the denoising UNet; rows are batch-major (b * frames + f).

    audio: (B, F, tokens, D) projected audio tokens; emotion: (B*F, 77, D) emotion text for the audio
    attention; masks: (pose, face, lip), each a list over the UNet levels of (B*F or 1, L) tensors;
    weights: (pose, face, lip) branch weights."""

    audio: torch.Tensor | None = None
    emotion: torch.Tensor | None = None
    masks: Sequence[Sequence[torch.Tensor]] | None = None
    weights: Sequence[float] = (1.0, 1.0, 1.0)


class DenoisingUNet(nn.Module):
    def __init__(self, config: NetConfig, zero_init: bool = True) -> None:
        super().__init__()
        base = build_sd_unet(config)
        install_decoupled_attention(base, config.context_dim, config.face_projection.tokens)
        adopt_parts(self, base, DENOISING_PARTS)
        self.use_audio_module = config.use_audio_module
        self.use_motion_module = config.use_motion_module
        # Training only: recompute each spatial layer (transformer + audio + motion module) in the backward
        # pass instead of storing its activations. Same numerics; never used under no_grad.
        self.gradient_checkpointing = False
        self._add_frame_modules(config, zero_init)

    def _add_frame_modules(self, config: NetConfig, zero_init: bool) -> None:
        """Audio modules in every attention block, motion modules in every block (docs/model.md §2.3).

        An audio module's inner width is heads x (input channels // heads), where "input channels" is the
        layer ResNet's input for down blocks and the block's `in_channels` argument for up blocks."""
        ch = list(config.unet["block_out_channels"])
        rev = ch[::-1]
        levels = len(ch)
        heads = config.num_heads
        layers = config.unet["layers_per_block"]
        mm = config.motion

        def audio(channels: int, in_channels: int, level: int) -> EmotiveAudioModule:
            return EmotiveAudioModule(channels, heads * (in_channels // heads), heads, level,
                                      config.audio_attention_dim, config.emotion_audio_head_dim,
                                      config.unet.get("norm_num_groups", 32), zero_init)

        def motion(channels: int, count: int) -> nn.ModuleList:
            return nn.ModuleList([MotionModule(channels, mm.num_attention_heads, mm.max_len, zero_init)
                                  for _ in range(count)])

        for i, block in enumerate(self.down_blocks):
            if self.use_audio_module and has_attention(block):
                ins = [ch[max(i - 1, 0)]] + [ch[i]] * (layers - 1)
                block.audio_modules = nn.ModuleList([audio(ch[i], c_in, i) for c_in in ins])
            if self.use_motion_module:
                block.motion_modules = motion(ch[i], layers)
        if self.use_audio_module:
            self.mid_block.audio_modules = nn.ModuleList([audio(ch[-1], ch[-1], levels - 1)])
        if self.use_motion_module:
            self.mid_block.motion_modules = motion(ch[-1], 1)
        for i, block in enumerate(self.up_blocks):
            if self.use_audio_module and has_attention(block):
                c_in = rev[min(i + 1, levels - 1)]
                block.audio_modules = nn.ModuleList([audio(rev[i], c_in, levels - 1 - i)
                                                     for _ in range(layers + 1)])
            if self.use_motion_module:
                block.motion_modules = motion(rev[i], layers + 1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, context: torch.Tensor,
                audio_inputs: AudioAttentionInputs, face_features: torch.Tensor | None = None,
                reference: ReferenceReader | None = None) -> torch.Tensor:
        """sample (B, 4, F, h, w) latents; context (B, tokens, D) = [emotion text ; face tokens];
        face_features (B, C, h, w) FaceLocator output, added after conv_in to every frame;
        reference: the bank reader (None: plain self-attention, no motion-frame prefix).
        Returns (B, 4, F, h, w), the v-prediction."""
        b, _, frames, height, width = sample.shape
        rows = b * frames
        x = sample.transpose(1, 2).flatten(0, 1)  # (b f) c h w, batch-major like the release
        emb = time_embedding(self, timestep, b, sample.dtype, sample.device).repeat_interleave(frames, 0)
        context = context.repeat_interleave(frames, 0)
        audio = None
        if self.use_audio_module:
            if audio_inputs.audio is None or audio_inputs.emotion is None or audio_inputs.masks is None:
                raise ValueError("the emotive audio attention needs audio tokens, emotion text and masks")
            audio = audio_inputs.audio.reshape(rows, *audio_inputs.audio.shape[2:])
        self_attention = reference.self_attention if reference is not None else plain_self_attention

        def layer(block: nn.Module, j: int, path: str, h: torch.Tensor) -> torch.Tensor:
            h = spatial_transformer(spatial_layer(block, j), h, context, path, self_attention)
            if audio is not None:
                h = block.audio_modules[j](h, audio, audio_inputs.emotion, audio_inputs.masks, audio_inputs.weights)
            if self.use_motion_module:
                prefix = reference.motion_tokens(path) if reference is not None else None
                h = block.motion_modules[j](h, frames, prefix)
            return h

        def checkpointed(block: nn.Module, j: int, path: str, h: torch.Tensor) -> torch.Tensor:
            return checkpoint(layer, block, j, path, h, use_reentrant=False)

        run_layer = checkpointed if self.gradient_checkpointing and torch.is_grad_enabled() else layer

        h = self.conv_in(x)
        if face_features is not None:
            h = h + face_features.repeat_interleave(frames, 0)
        h = unet_body(self, h, emb, run_layer)
        h = self.conv_out(self.conv_act(self.conv_norm_out(h)))
        return h.unflatten(0, (b, frames)).transpose(1, 2)
