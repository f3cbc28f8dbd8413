"""Data preparation: a talking-head video -> a prepared clip folder (Hallo's preprocessing, docs/model.md §6.5,
on our layout, see :mod:`training.data.metadata`).

Per video: frames at 25 fps; insightface on every ``face_every``-th frame for the face and lip rectangles
(106-point landmarks, expand ratio 1.0 as in Hallo's training data) whose union over the frames gives the
FaceLocator box and the three blurred attention masks (the inference recipe of
:mod:`emocast_core.preprocess.face_masks`); the identity embedding of the first frame's largest face; the
wav2vec2 hidden states per frame (optionally of the separated vocals). Hooks, all optional: an emotion
classifier for unlabelled videos (the paper used Emotion-FAN fine-tuned on MEAD), a lip-sync scorer that
rejects badly synced videos (SyncNet's confidence / distance), and a text generator for the descriptions.
A clip folder appears only when complete (written to a temporary folder, then renamed).
"""
from __future__ import annotations

import logging
import math
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch

from emocast_core.preprocess.audio import VocalSeparator, to_mono_16k
from emocast_core.preprocess.audio_features import Wav2Vec2AudioEncoder, extract_audio_features
from emocast_core.preprocess.face import FaceAnalyzer
from emocast_core.preprocess.face_masks import Rect, rect_mask, separated_masks
from emocast_core.rates import FPS
from emocast_core.video import read_video

from .metadata import (
    META_FILE, ClipMeta, PreparedClip, TemplateTextGenerator, TextGenerator, load_clip, normalize_emotion,
    save_clip_meta,
)

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class ClipLabel:
    """What is known about a video before preparation; `emotion` None asks the emotion classifier."""

    clip_id: str
    identity: str
    emotion: str | None = None
    intensity: int = 1
    source: str = ""
    texts: tuple[str, ...] = ()


class EmotionClassifier(Protocol):
    """(frames (T, H, W, 3) RGB uint8) -> (emotion label, intensity 1-3)."""

    def __call__(self, frames: np.ndarray) -> tuple[str, int]: ...


class SyncScorer(Protocol):
    """(frames at 25 fps, mono 16 kHz waveform) -> (confidence, distance), SyncNet's Sync-C and Sync-D."""

    def __call__(self, frames: np.ndarray, waveform: torch.Tensor) -> tuple[float, float]: ...


@dataclass(frozen=True)
class PrepareSettings:
    face_expand_ratio: float = 1.0
    lip_expand_ratio: float = 1.0
    face_every: int = 1  # run the face models on every n-th frame (Hallo: every frame)
    min_sync_confidence: float | None = None  # with a SyncScorer: reject below this Sync-C
    max_sync_distance: float | None = None  # ... or above this Sync-D
    texts_per_clip: int = 4


def resample_indices(num_frames: int, source_fps: float, target_fps: float = FPS) -> np.ndarray:
    """Source frame shown at each target time k / target_fps (the frame whose interval contains it)."""
    if not (math.isfinite(source_fps) and source_fps > 0):
        raise ValueError(f"the video reports an unusable frame rate ({source_fps}); re-encode it at {FPS} fps")
    count = int(math.floor(num_frames * target_fps / source_fps + 1e-9))
    indices = np.floor(np.arange(count) * source_fps / target_fps + 1e-9).astype(np.int64)
    return np.minimum(indices, num_frames - 1)


def union_rect(rects: Iterable[Rect]) -> Rect:
    rects = list(rects)
    if not rects:
        raise ValueError("no rectangle to unite")
    return (min(r[0] for r in rects), min(r[1] for r in rects), max(r[2] for r in rects), max(r[3] for r in rects))


_MEAD_PATH = re.compile(r"(?P<id>[MW]\d{3})[/\\]video[/\\](?P<view>[a-z_0-9]+)[/\\](?P<emotion>[a-z]+)[/\\]"
                        r"level_(?P<level>[123])[/\\](?P<take>\d+)\.mp4$", re.IGNORECASE)


def parse_mead_path(path: str | Path) -> ClipLabel:
    """A MEAD video path ``<ID>/video/<view>/<emotion>/level_<n>/<take>.mp4`` -> its label."""
    match = _MEAD_PATH.search(Path(path).as_posix())
    if match is None:
        raise ValueError(f"{path} does not follow MEAD's layout <ID>/video/<view>/<emotion>/level_<n>/<take>.mp4")
    emotion = normalize_emotion(match["emotion"])
    view = match["view"].lower()
    suffix = "" if view == "front" else f"_{view}"
    clip_id = f"{match['id']}_{emotion}_{match['level']}_{match['take']}{suffix}"
    return ClipLabel(clip_id, match["id"].upper(), emotion, int(match["level"]), "MEAD")


@dataclass
class Preparer:
    """The models of the preparation, loaded once for many videos."""

    analyzer: FaceAnalyzer
    audio_encoder: Wav2Vec2AudioEncoder
    settings: PrepareSettings = field(default_factory=PrepareSettings)
    emotion_classifier: EmotionClassifier | None = None
    sync_scorer: SyncScorer | None = None
    text_generator: TextGenerator | None = None
    separator: VocalSeparator | None = None

    def __post_init__(self) -> None:
        if self.text_generator is None:  # one seeded generator for all videos, so that phrasings vary
            self.text_generator = TemplateTextGenerator()

    def prepare(self, video: str | Path, out_root: str | Path, label: ClipLabel) -> PreparedClip | None:
        """Prepare one video into ``out_root/<clip_id>``; None when the sync filter rejects it."""
        video, out_root = Path(video), Path(out_root)
        target = out_root / label.clip_id
        if (target / META_FILE).is_file():
            raise FileExistsError(f"{target} is already prepared; delete it to prepare {video} again")
        raw, fps, audio = read_video(video)
        if audio is None:
            raise ValueError(f"{video} has no audio track: talking-head training needs the speech")
        frames = raw[resample_indices(len(raw), fps)]
        if self.sync_scorer is not None and not self._synced(video, frames, to_mono_16k(audio)):
            return None
        emotion, intensity = label.emotion, label.intensity
        if emotion is None:
            if self.emotion_classifier is None:
                raise ValueError(f"{video}: no emotion label and no emotion classifier to infer one")
            emotion, intensity = self.emotion_classifier(frames)
        face_rect, lip_rect, identity = self._face(video, frames)
        features = extract_audio_features(audio, self.audio_encoder, clip_length=1, separator=self.separator,
                                          fps=FPS).features
        texts = label.texts or tuple(self.text_generator(emotion, intensity, self.settings.texts_per_clip))
        meta = ClipMeta(clip_id=label.clip_id, identity=label.identity, emotion=emotion, intensity=intensity,
                        texts=texts, num_frames=len(frames), fps=FPS, source=label.source)
        partial = out_root / f".{label.clip_id}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            _write_clip(partial, meta, frames, face_rect, lip_rect, identity, features)
            if target.exists():
                shutil.rmtree(target)
            partial.rename(target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        logger.info("prepared %s: %d frames, %d audio frames, face box %s", label.clip_id, len(frames),
                    features.shape[0], face_rect)
        return load_clip(target)

    def _synced(self, video: Path, frames: np.ndarray, waveform: torch.Tensor) -> bool:
        confidence, distance = self.sync_scorer(frames, waveform)
        s = self.settings
        low = s.min_sync_confidence is not None and confidence < s.min_sync_confidence
        far = s.max_sync_distance is not None and distance > s.max_sync_distance
        if low or far:
            logger.info("skipping %s: lip sync confidence %.2f, distance %.2f", video, confidence, distance)
        return not (low or far)

    def _face(self, video: Path, frames: np.ndarray) -> tuple[Rect, Rect, torch.Tensor]:
        faces, lips = [], []
        identity = None
        for index in range(0, len(frames), max(1, self.settings.face_every)):
            detected = self.analyzer.detect(frames[index])
            if not detected:
                raise ValueError(f"{video}: no face in frame {index} (at {FPS} fps); every frame must show the face")
            face = detected[0]
            if identity is None:
                if face.embedding is None:
                    raise RuntimeError("the recognition model produced no embedding")
                identity = torch.from_numpy(np.asarray(face.embedding, dtype=np.float32).copy())
            face_rect, lip_rect = self.analyzer.region_rects(face, frames[index], (0, 0),
                                                             self.settings.face_expand_ratio,
                                                             self.settings.lip_expand_ratio)
            faces.append(face_rect)
            lips.append(lip_rect)
        return union_rect(faces), union_rect(lips), identity


def _write_clip(folder: Path, meta: ClipMeta, frames: np.ndarray, face_rect: Rect, lip_rect: Rect,
                identity: torch.Tensor, features: torch.Tensor) -> None:
    height, width = frames.shape[1:3]
    frames_dir = folder / meta.frames_dir
    frames_dir.mkdir(parents=True)
    for i, frame in enumerate(frames):
        if not cv2.imwrite(str(frames_dir / f"{i:05d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write frame {i} to {frames_dir}")
    cv2.imwrite(str(folder / meta.face_mask), rect_mask(face_rect, width, height))
    for relative, mask in zip((meta.pose_mask, meta.face_region_mask, meta.lip_mask),
                              separated_masks(face_rect, lip_rect, width, height)):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / relative), mask)
    torch.save(identity, folder / meta.face_emb)
    torch.save(features.float().contiguous(), folder / meta.audio_emb)
    save_clip_meta(meta, folder)


@dataclass
class PrepareReport:
    prepared: list[PreparedClip] = field(default_factory=list)
    already: int = 0  # prepared by an earlier run: kept as they are
    rejected: int = 0  # by the lip-sync filter
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (video, why): corrupt, no face, no audio ...

    def summary(self) -> str:
        lines = [f"prepared {len(self.prepared)} video(s), kept {self.already} already prepared, "
                 f"{self.rejected} rejected by the lip-sync filter, {len(self.failed)} failed"]
        lines += [f"  failed: {video}: {why}" for video, why in self.failed]
        return "\n".join(lines)


def prepare_all(preparer: Preparer, jobs: Iterable[tuple[str | Path, ClipLabel]],
                out_root: str | Path) -> PrepareReport:
    """Prepare many videos, resumably: clips already under `out_root` are kept, and a video that cannot be
    prepared (corrupt file, no face, no audio, ...) is reported and skipped instead of stopping the run."""
    out_root = Path(out_root)
    report = PrepareReport()
    for video, label in jobs:
        if (out_root / label.clip_id / META_FILE).is_file():
            report.already += 1
            continue
        try:
            clip = preparer.prepare(video, out_root, label)
        except (ValueError, OSError, RuntimeError) as exc:
            logger.warning("skipping %s: %s", video, exc)
            report.failed.append((Path(video), str(exc)))
            continue
        if clip is None:
            report.rejected += 1
        else:
            report.prepared.append(clip)
    return report


def link_neutral_videos(clips: Sequence[PreparedClip]) -> int:
    """Give every emotional clip without a `neutral_video` the first neutral clip (by id) of its
    identity, rewriting its meta.json; returns how many were linked."""
    neutral: dict[str, str] = {}
    for clip in sorted(clips, key=lambda c: c.meta.clip_id):
        if clip.meta.is_neutral:
            neutral.setdefault(clip.meta.identity, clip.meta.clip_id)
    linked = 0
    for clip in clips:
        meta = clip.meta
        if meta.is_neutral or meta.neutral_video is not None or meta.identity not in neutral:
            continue
        save_clip_meta(replace(meta, neutral_video=neutral[meta.identity]), clip.folder)
        linked += 1
    return linked
