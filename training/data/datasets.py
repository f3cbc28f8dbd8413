"""Stage-1 image pairs (with emotion-aware reference sampling) and stage-2 clips, read from the prepared
layout described in :mod:`training.data.metadata`.

Images are resized to a square ``size`` (no crop, as Hallo's datasets do), frames to [-1, 1], the
FaceLocator mask to [0, 1] on 3 channels; the three attention masks go to the four UNet resolutions
exactly as at inference (:func:`emocast_core.preprocess.face_masks.resize_mask_levels`).
"""
from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, get_worker_info

from emocast_core.preprocess.face_masks import resize_mask_levels

from .metadata import ClipMeta, EmotiveTextBank, PreparedClip

logger = logging.getLogger(__name__)

# Hallo drops stage-2 videos whose frame count and audio-feature count differ by more than this.
MAX_AUDIO_FRAME_MISMATCH = 3


# ---- file readers --------------------------------------------------------------------------------

def load_frame(path: Path, size: int) -> torch.Tensor:
    """(3, size, size) float32 in [-1, 1] (PIL bilinear resize of the whole image)."""
    with Image.open(path) as image:
        rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def load_face_region(path: Path, size: int) -> torch.Tensor:
    """FaceLocator input: the 0/255 face-box mask as (3, size, size) float32 in [0, 1]."""
    if not path.is_file():
        raise FileNotFoundError(f"face mask {path} does not exist")
    with Image.open(path) as image:
        rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255.0)


def load_mask_levels(path: Path, latent_size: int) -> list[torch.Tensor]:
    """A uint8 attention-mask image at the four UNet resolutions, each (L,) in [0, 1]."""
    if not path.is_file():
        raise FileNotFoundError(f"attention mask {path} does not exist")
    with Image.open(path) as image:
        mask = np.asarray(image.convert("L"), dtype=np.uint8)
    return resize_mask_levels(mask, latent_size)


def load_tensor_file(path: Path) -> torch.Tensor:
    """A float tensor saved with ``torch.save`` (read with weights_only) or a ``.npy`` array."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False)).float()
    value = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{path} holds a {type(value).__name__}, expected one tensor")
    return value.float()


def load_identity(path: Path, dim: int = 512) -> torch.Tensor:
    emb = load_tensor_file(path).reshape(-1)
    if emb.numel() != dim:
        raise ValueError(f"identity embedding {path} has {emb.numel()} values, expected {dim} (ArcFace)")
    return emb


def audio_length(path: Path) -> int:
    """Frames of an audio-feature file, read without loading its data where possible."""
    if path.suffix == ".npy":
        return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])
    return int(torch.load(path, map_location="meta", weights_only=True).shape[0])


def _item_rng(seed: int, index: int, calls: int) -> random.Random:
    """Independent draws per item, per call and per DataLoader worker (each worker has its own seed)."""
    worker = get_worker_info()
    return random.Random(f"{seed}/{worker.seed if worker else 0}/{index}/{calls}")


def pick_text(meta: ClipMeta, bank: EmotiveTextBank, rng: random.Random) -> str:
    """One of the clip's descriptions, or a template phrasing of its label when it has none."""
    if meta.texts:
        return rng.choice(meta.texts)
    return bank.sample(meta.emotion, meta.intensity, rng)[0]


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation of the dataset per epoch, drawn from ``seed + epoch`` alone: every process of a
    multi-GPU run sees the same order (accelerate shards its batches), and a resumed run can rebuild the
    order of any epoch without replaying the ones before it."""

    def __init__(self, length: int, seed: int) -> None:
        if length < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


# ---- emotion-aware pairing -----------------------------------------------------------------------

@dataclass(frozen=True)
class PairDraw:
    """Which frames form one stage-1 training pair (clip indices into the sampler's clip list)."""

    target_clip: int
    target_frame: int
    reference_clip: int
    reference_frame: int
    fallback: bool  # an emotional target whose reference had to come from its own video


class EmotionAwarePairSampler:
    """Emotion-aware sampling (paper §3.4.1): an emotional target frame gets its reference frame from a
    neutral video of the same identity, so that the model learns to add the emotion rather than copy it.

    The neutral video is the clip's ``neutral_video`` link when that clip is in the dataset (it must be
    neutral and of the same identity), else any neutral clip of the identity. Without one, and for
    neutral targets, the reference comes from the target's own video, at least ``sample_margin`` frames
    away when the video is long enough (Hallo's rule). Emotional targets paired that way are fallbacks:
    counted here per clip, and flagged on every draw so that the training loop can count them."""

    def __init__(self, clips: Sequence[ClipMeta], sample_margin: int = 30, emotion_aware: bool = True) -> None:
        if not clips:
            raise ValueError("the pair sampler needs at least one clip")
        if sample_margin < 0:
            raise ValueError(f"sample_margin must be >= 0, got {sample_margin}")
        self.clips = list(clips)
        self.sample_margin = sample_margin
        self.emotion_aware = emotion_aware
        by_id = {meta.clip_id: i for i, meta in enumerate(self.clips)}
        neutral_by_identity: dict[str, list[int]] = {}
        for i, meta in enumerate(self.clips):
            if meta.is_neutral:
                neutral_by_identity.setdefault(meta.identity, []).append(i)
        self._references: list[tuple[int, ...]] = []
        unresolved_links = 0
        for meta in self.clips:
            refs: tuple[int, ...] = ()
            if emotion_aware and not meta.is_neutral:
                if meta.neutral_video is not None and meta.neutral_video in by_id:
                    refs = (self._checked_link(meta, self.clips[by_id[meta.neutral_video]], by_id),)
                else:
                    unresolved_links += meta.neutral_video is not None
                    refs = tuple(neutral_by_identity.get(meta.identity, ()))
            self._references.append(refs)
        self.clips_without_neutral = tuple(
            meta.clip_id for meta, refs in zip(self.clips, self._references)
            if emotion_aware and not meta.is_neutral and not refs)
        if unresolved_links:
            logger.info("%d neutral_video link(s) point to clips outside this dataset; searched by identity "
                        "instead", unresolved_links)
        if self.clips_without_neutral:
            logger.warning("emotion-aware sampling: %d of %d emotional clips have no neutral video of their "
                           "identity; their reference frames come from the same video (fallback)",
                           len(self.clips_without_neutral), sum(not m.is_neutral for m in self.clips))

    @staticmethod
    def _checked_link(meta: ClipMeta, neutral: ClipMeta, by_id: dict[str, int]) -> int:
        if neutral.identity != meta.identity:
            raise ValueError(f"clip {meta.clip_id} (identity {meta.identity!r}) links neutral_video "
                             f"{neutral.clip_id}, which is identity {neutral.identity!r}: the neutral video must "
                             "show the same person")
        if not neutral.is_neutral:
            raise ValueError(f"clip {meta.clip_id} links neutral_video {neutral.clip_id}, whose emotion is "
                             f"{neutral.emotion!r}, not neutral")
        return by_id[neutral.clip_id]

    def reference_clips(self, index: int) -> tuple[int, ...]:
        """Clips the reference of target clip `index` may come from (empty: its own video)."""
        return self._references[index]

    def draw(self, index: int, rng: random.Random) -> PairDraw:
        meta = self.clips[index]
        refs = self._references[index]
        if refs:
            ref_clip = rng.choice(refs)
            return PairDraw(index, rng.randrange(meta.num_frames), ref_clip,
                            rng.randrange(self.clips[ref_clip].num_frames), fallback=False)
        ref_frame, target_frame = self._same_video_frames(meta.num_frames, rng)
        fallback = self.emotion_aware and not meta.is_neutral
        return PairDraw(index, target_frame, index, ref_frame, fallback)

    def _same_video_frames(self, frames: int, rng: random.Random) -> tuple[int, int]:
        ref = rng.randrange(frames)
        far = [f for f in range(frames) if abs(f - ref) >= self.sample_margin]
        return ref, rng.choice(far) if far else rng.randrange(frames)


# ---- datasets ------------------------------------------------------------------------------------

def _check_size(size: int) -> None:
    if size < 64 or size % 64:
        raise ValueError(f"image size must be a positive multiple of 64 (latents a multiple of 8), got {size}")


class Stage1Dataset(Dataset):
    """One (target, reference) image pair per clip and epoch.

    Item: ``target``/``reference`` (3, S, S) in [-1, 1]; ``face_region`` (3, S, S) in [0, 1] (the
    target clip's face box); ``identity`` (512,); ``text`` (one description of the target clip);
    ``clip_id``, ``reference_clip_id``; ``fallback`` (bool, see :class:`EmotionAwarePairSampler`)."""

    def __init__(self, clips: Sequence[PreparedClip], size: int = 512, sample_margin: int = 30,
                 emotion_aware: bool = True, seed: int = 0, text_bank: EmotiveTextBank | None = None,
                 identity_dim: int = 512) -> None:
        _check_size(size)
        self.clips = list(clips)
        self.size = size
        self.seed = seed
        self.identity_dim = identity_dim
        self.text_bank = text_bank or EmotiveTextBank()
        self.sampler = EmotionAwarePairSampler([c.meta for c in self.clips], sample_margin, emotion_aware)
        self._frames = [clip.frame_paths() for clip in self.clips]
        self.draws = 0  # items drawn so far (part of the seed of each draw; restored on resume)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        self.draws += 1
        rng = _item_rng(self.seed, index, self.draws)
        draw = self.sampler.draw(index, rng)
        target = self.clips[draw.target_clip]
        reference = self.clips[draw.reference_clip]
        return {
            "target": load_frame(self._frames[draw.target_clip][draw.target_frame], self.size),
            "reference": load_frame(self._frames[draw.reference_clip][draw.reference_frame], self.size),
            "face_region": load_face_region(target.face_mask, self.size),
            "identity": load_identity(target.face_emb, self.identity_dim),
            "text": pick_text(target.meta, self.text_bank, rng),
            "clip_id": target.meta.clip_id,
            "reference_clip_id": reference.meta.clip_id,
            "fallback": draw.fallback,
        }


@dataclass(frozen=True)
class ClipWindow:
    """Frame range of a stage-2 sample: clip frames start..start+frames-1, motion frames before it."""

    start: int
    reference_frame: int


class Stage2Dataset(Dataset):
    """One video clip per source clip and epoch (Hallo's ``TalkingVideoDataset`` on our layout).

    Item: ``frames`` (F, 3, S, S) and ``motion`` (M, 3, S, S) in [-1, 1] (the M frames right before the
    clip); ``reference`` (3, S, S), a random frame of the same video; ``audio`` (F, 2*margin+1, layers,
    channels): wav2vec2 frames start+f-margin .. start+f+margin of every clip frame; ``masks``: dict
    ``pose`` / ``face`` / ``lip`` -> list of the four UNet levels (L,); ``face_region``, ``identity``,
    ``text``, ``clip_id``. Clips too short for F + M frames plus the audio margin are left out (logged)."""

    def __init__(self, clips: Sequence[PreparedClip], size: int = 512, frames: int = 14, motion_frames: int = 2,
                 audio_margin: int = 2, seed: int = 0, text_bank: EmotiveTextBank | None = None,
                 identity_dim: int = 512) -> None:
        _check_size(size)
        if frames < 1 or motion_frames < 0 or audio_margin < 0:
            raise ValueError(f"need frames >= 1, motion_frames >= 0 and audio_margin >= 0 (got {frames}, "
                             f"{motion_frames}, {audio_margin})")
        self.size, self.frames, self.motion_frames, self.audio_margin = size, frames, motion_frames, audio_margin
        self.seed = seed
        self.identity_dim = identity_dim
        self.text_bank = text_bank or EmotiveTextBank()
        self.clips: list[PreparedClip] = []
        self._frames: list[list[Path]] = []
        self._usable: list[int] = []
        skipped_short, skipped_mismatch = [], []
        for clip in clips:
            if clip.audio_emb is None:
                raise ValueError(f"clip {clip.meta.clip_id} has no audio_emb: stage 2 needs audio features")
            n_audio = audio_length(clip.audio_emb)
            if abs(n_audio - clip.meta.num_frames) > MAX_AUDIO_FRAME_MISMATCH:
                skipped_mismatch.append(clip.meta.clip_id)
                continue
            usable = min(clip.meta.num_frames, n_audio - audio_margin)
            if usable - frames < max(motion_frames, audio_margin):
                skipped_short.append(clip.meta.clip_id)
                continue
            self.clips.append(clip)
            self._frames.append(clip.frame_paths())
            self._usable.append(usable)
        if skipped_mismatch:
            logger.warning("stage 2: left out %d clip(s) whose audio features and frames differ by more than "
                           "%d frames: %s", len(skipped_mismatch), MAX_AUDIO_FRAME_MISMATCH,
                           ", ".join(skipped_mismatch[:5]))
        if skipped_short:
            logger.warning("stage 2: left out %d clip(s) shorter than %d frames + %d motion frames + audio "
                           "margin: %s", len(skipped_short), frames, motion_frames, ", ".join(skipped_short[:5]))
        if not self.clips:
            raise ValueError("stage 2: no clip is long enough for the configured frames / motion frames / "
                             "audio margin")
        self.draws = 0  # items drawn so far (part of the seed of each draw; restored on resume)

    def __len__(self) -> int:
        return len(self.clips)

    def window(self, index: int, rng: random.Random) -> ClipWindow:
        """Start uniform in [max(M, margin), usable - F]: motion frames, clip and audio windows all exist."""
        low = max(self.motion_frames, self.audio_margin)
        start = rng.randint(low, self._usable[index] - self.frames)
        return ClipWindow(start, rng.randrange(self.clips[index].meta.num_frames))

    def __getitem__(self, index: int) -> dict:
        self.draws += 1
        rng = _item_rng(self.seed, index, self.draws)
        clip = self.clips[index]
        window = self.window(index, rng)
        paths = self._frames[index]
        start, f, m = window.start, self.frames, self.motion_frames
        frames = torch.stack([load_frame(paths[i], self.size) for i in range(start, start + f)])
        motion = torch.stack([load_frame(paths[i], self.size) for i in range(start - m, start)]) if m else \
            torch.empty(0, 3, self.size, self.size)
        features = load_tensor_file(clip.audio_emb)  # (N, layers, channels)
        offsets = torch.arange(-self.audio_margin, self.audio_margin + 1)
        audio = features[(torch.arange(start, start + f)[:, None] + offsets)]
        latent = self.size // 8
        pose, face, lip = (load_mask_levels(p, latent) for p in clip.region_masks)
        return {
            "frames": frames,
            "motion": motion,
            "reference": load_frame(paths[window.reference_frame], self.size),
            "audio": audio,
            "masks": {"pose": pose, "face": face, "lip": lip},
            "face_region": load_face_region(clip.face_mask, self.size),
            "identity": load_identity(clip.face_emb, self.identity_dim),
            "text": pick_text(clip.meta, self.text_bank, rng),
            "clip_id": clip.meta.clip_id,
            "start": start,
        }
