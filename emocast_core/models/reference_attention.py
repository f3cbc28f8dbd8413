"""Reference attention: how the ReferenceNet's features reach the denoising UNet.

The ReferenceNet runs once per clip on the reference image and the motion frames. Each of its spatial
transformer blocks *writes* the LayerNorm-ed input of its self-attention to a bank. The denoising UNet's
block at the same path *reads* it: a frame's self-attention sees `[own tokens ; reference tokens]` as keys
and values, and the motion frames' features are put in front of the clip for the motion modules.

Which bank row a denoising row reads is a `ReferencePairing`. The released pipeline pairs rows in a
peculiar way (docs/release_quirks.md §3) that the weights were trained with; `ReferencePairing.official_cfg`
reproduces it and `per_sample` is the plain pairing for training batches.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention

from .attention import attend, heads_attention, output_projection
from .diffusers_unet import SelfAttention


@dataclass(frozen=True)
class ReferencePairing:
    """reference_rows[r]: bank row that denoising row r attends to (-1: plain self-attention);
    motion_rows[b]: bank rows of batch element b's motion frames, oldest first."""

    reference_rows: tuple[int, ...]
    motion_rows: tuple[tuple[int, ...], ...]

    @classmethod
    def official_cfg(cls, frames: int, motion_frames: int) -> "ReferencePairing":
        """The released CFG pairing. The ReferenceNet batch is `[ref, m1.., ref, m1..]` (two groups of
        1+M rows) with contexts tiled `[u, c, u, c, ...]`; the unconditional half (rows < frames) does
        not see the reference; conditional row r reads the reference of group `r mod 2`; group g's motion
        rows are the motion features of batch element g."""
        group = 1 + motion_frames
        refs = [-1] * frames + [(r % 2) * group for r in range(frames, 2 * frames)]
        motion = tuple(tuple(g * group + 1 + m for m in range(motion_frames)) for g in range(2))
        return cls(tuple(refs), motion)

    @classmethod
    def per_sample(cls, batch: int, frames: int, motion_frames: int) -> "ReferencePairing":
        """Bank laid out `[ref_b, m1_b, ..]` per sample; every frame of sample b reads ref_b."""
        return cls.for_samples([True] * batch, frames, motion_frames)

    @classmethod
    def for_samples(cls, attend: Sequence[bool], frames: int, motion_frames: int,
                    bank_samples: Sequence[int] | None = None) -> "ReferencePairing":
        """Bank holding `[ref, m1..mM]` of each sample in `bank_samples` (default: all), in that order.

        Every frame of sample b reads its own reference when `attend[b]`, else plain self-attention (a
        training sample whose reference is dropped); its motion prefix is its own motion frames, so with
        motion frames every sample must be in the bank."""
        bank_samples = range(len(attend)) if bank_samples is None else bank_samples
        group = 1 + motion_frames
        slot = {b: k for k, b in enumerate(bank_samples)}
        rows: list[int] = []
        for b, wanted in enumerate(attend):
            if wanted and b not in slot:
                raise ValueError(f"sample {b} should attend to its reference but is not in the bank")
            rows += [slot[b] * group if wanted else -1] * frames
        if motion_frames and len(slot) != len(attend):
            raise ValueError("with motion frames every sample needs its group in the reference bank")
        motion = tuple(tuple(slot[b] * group + 1 + m for m in range(motion_frames)) if b in slot else ()
                       for b in range(len(attend)))
        return cls(tuple(rows), motion)


@dataclass
class ReferenceBank:
    """Normalised self-attention inputs of every ReferenceNet spatial block, by block path."""

    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def write(self, path: str, tokens: torch.Tensor) -> None:
        if path in self.features:
            raise RuntimeError(f"reference bank already holds features for {path}: a bank is written once "
                               f"per clip")
        self.features[path] = tokens

    def rounded(self, dtype: torch.dtype | None) -> "ReferenceBank":
        """The release copies banks to the reader in fp16 whatever the run dtype; `dtype` reproduces that."""
        if dtype is None:
            return self
        return ReferenceBank({k: v.to(dtype) for k, v in self.features.items()})


@dataclass
class ReferenceReader:
    """The denoising UNet's view of a bank: reference keys for self-attention, motion-frame prefixes."""

    bank: ReferenceBank
    pairing: ReferencePairing

    def _tokens(self, path: str) -> torch.Tensor:
        try:
            return self.bank.features[path]
        except KeyError:
            raise RuntimeError(f"reference bank has no features for {path}; run the ReferenceNet first")  # noqa: B904

    def self_attention(self, path: str, attn: Attention, normed: torch.Tensor) -> torch.Tensor:
        rows = self.pairing.reference_rows
        if len(rows) != normed.shape[0]:
            raise ValueError(f"reference pairing covers {len(rows)} rows, the UNet batch has {normed.shape[0]}")
        # Row selections come from the static pairing: no device synchronisation in the hot path.
        plain = [r for r, ref in enumerate(rows) if ref < 0]
        paired = [r for r, ref in enumerate(rows) if ref >= 0]
        if not paired:
            return attend(attn, normed)
        bank = self._tokens(path)
        device = normed.device
        paired_idx = torch.tensor(paired, device=device)
        own = normed.index_select(0, paired_idx)
        ref = bank.index_select(0, torch.tensor([rows[r] for r in paired], device=bank.device)).to(own)
        context = torch.cat([own, ref], dim=1)
        mixed = heads_attention(attn.to_q(own), attn.to_k(context), attn.to_v(context), attn.heads)
        mixed = output_projection(attn, mixed)
        if not plain:
            return mixed
        out = torch.empty_like(normed)
        out.index_copy_(0, paired_idx, mixed)
        plain_idx = torch.tensor(plain, device=device)
        out.index_copy_(0, plain_idx, attend(attn, normed.index_select(0, plain_idx)))
        return out

    def motion_tokens(self, path: str) -> torch.Tensor:
        """(B, M, L, C) motion-frame features in front of each batch element's clip."""
        bank = self._tokens(path)
        index = torch.tensor(self.pairing.motion_rows, device=bank.device)
        return bank[index]


def bank_writer(bank: ReferenceBank) -> SelfAttention:
    def write_then_attend(path: str, attn: Attention, normed: torch.Tensor) -> torch.Tensor:
        bank.write(path, normed)
        return attend(attn, normed)
    return write_then_attend
