"""Synthetic training data and an end-to-end smoke run of the whole training chain with the tiny model, on
the CPU.

Two kinds of synthetic data, both cartoon faces (ellipses whose head sways, whose mouth opens and whose
brows, eyes and mouth corners show the emotion) of three identities with neutral and emotional clips:

* :func:`make_synthetic_videos`: talking-head MP4s whose audio track is eSpeak NG speech and whose mouth
  opens with the loudness of that speech, for the whole chain (videos -> :class:`~training.data.prepare.Preparer`
  -> stage 1 -> stage 2 -> progressive phases) that :func:`run_smoke` runs;
* :func:`make_synthetic_dataset`: an already prepared dataset (the layout of :mod:`training.data.metadata`)
  with random identity embeddings and random audio features whose first channel follows the mouth, for
  fast unit tests of the datasets and the loop.

One identity has no neutral clip, so that emotion-aware sampling has to fall back.
"""
from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

from emocast_core.checkpoints import check_layout, load_net, read_layout
from emocast_core.config import NetConfig
from emocast_core.preprocess.audio import AudioClip
from emocast_core.preprocess.audio_features import Wav2Vec2AudioEncoder
from emocast_core.preprocess.face import FaceAnalyzer
from emocast_core.preprocess.face_masks import rect_mask, separated_masks
from emocast_core.rates import FPS, SAMPLE_RATE
from emocast_core.testing.speech import synthesize_speech
from emocast_core.testing.tiny_models import write_tiny_models
from emocast_core.video import write_video

from .config import StageConfig, config_from_dict
from .data.metadata import (
    ClipMeta, PreparedClip, TemplateTextGenerator, discover_clips, save_clip_meta,
)
from .data.prepare import ClipLabel, Preparer, PrepareSettings, link_neutral_videos, prepare_all
from .progressive import Phase, ProgressiveConfig, run_progressive
from .runner import train

logger = logging.getLogger(__name__)

# Per emotion: (mouth-corner curve, brow tilt, eye opening), each scaled by the intensity.
_EXPRESSION = {
    "neutral": (0.0, 0.0, 1.0), "happy": (0.6, 0.0, 0.9), "sad": (-0.5, -0.4, 0.8),
    "surprised": (0.0, 0.0, 1.6), "fear": (-0.2, -0.5, 1.4), "disgusted": (-0.4, 0.3, 0.7),
    "angry": (-0.3, 0.6, 0.8), "contempt": (0.2, 0.2, 0.8),
}
# (identity, clips as (emotion, intensity)); the last identity has no neutral video on purpose.
_CLIPS = (
    ("id0", (("neutral", 1), ("happy", 3), ("angry", 2))),
    ("id1", (("neutral", 1), ("sad", 2), ("surprised", 3))),
    ("id2", (("fear", 3), ("disgusted", 1))),
)


@dataclass(frozen=True)
class _Face:
    """Face geometry of one frame, in pixels."""

    center: tuple[int, int]
    axes: tuple[int, int]
    mouth_open: float  # 0..1


def _face_at(frame: int, size: int, phase: float) -> _Face:
    sway = 0.04 * size * math.sin(0.3 * frame + phase)
    center = (int(size / 2 + sway), int(size * 0.52))
    mouth = 0.5 + 0.5 * math.sin(0.9 * frame + 2 * phase)
    return _Face(center, (int(size * 0.28), int(size * 0.36)), mouth)


def _draw(face: _Face, size: int, skin: tuple[int, int, int], background: tuple[int, int, int],
          expression: tuple[float, float, float], intensity: int) -> np.ndarray:
    curve, tilt, eyes = (e * intensity / 3 if i < 2 else 1 + (e - 1) * intensity / 3
                         for i, e in enumerate(expression))
    image = np.full((size, size, 3), background, np.uint8)
    cx, cy = face.center
    ax, ay = face.axes
    cv2.ellipse(image, face.center, face.axes, 0, 0, 360, skin, -1, cv2.LINE_AA)
    for side in (-1, 1):
        eye = (cx + side * ax // 2, cy - ay // 4)
        cv2.ellipse(image, eye, (max(1, ax // 6), max(1, int(ay / 12 * eyes))), 0, 0, 360, (30, 30, 30), -1)
        brow_y = eye[1] - ay // 6
        dy = int(side * tilt * ay / 10)
        cv2.line(image, (eye[0] - ax // 5, brow_y - dy), (eye[0] + ax // 5, brow_y + dy), (40, 25, 20), 2)
    mouth = (cx, cy + ay // 2)
    cv2.ellipse(image, mouth, (ax // 3, max(1, int(ay / 10 * (0.2 + face.mouth_open)))), 0, 0, 360,
                (90, 20, 30), -1)
    corner_y = mouth[1] - int(curve * ay / 8)
    for side in (-1, 1):
        cv2.line(image, (mouth[0] + side * ax // 3, mouth[1]), (mouth[0] + side * (ax // 3 + 4), corner_y),
                 (90, 20, 30), 2)
    return image


def _face_rects(faces: list[_Face], size: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Union face box and union lip box over all frames (Hallo's expand ratio 1.0), end-exclusive."""
    def clamp(v: int) -> int:
        return max(0, min(size, v))

    fx0 = min(f.center[0] - f.axes[0] for f in faces)
    fx1 = max(f.center[0] + f.axes[0] for f in faces)
    fy0 = min(f.center[1] - f.axes[1] for f in faces)
    fy1 = max(f.center[1] + f.axes[1] for f in faces)
    lx0 = min(f.center[0] - f.axes[0] // 3 - 4 for f in faces)
    lx1 = max(f.center[0] + f.axes[0] // 3 + 4 for f in faces)
    ly0 = min(f.center[1] + f.axes[1] // 2 - f.axes[1] // 5 for f in faces)
    ly1 = max(f.center[1] + f.axes[1] // 2 + f.axes[1] // 5 for f in faces)
    return ((clamp(fx0), clamp(fy0), clamp(fx1), clamp(fy1)), (clamp(lx0), clamp(ly0), clamp(lx1), clamp(ly1)))


def write_synthetic_clip(folder: Path, meta: ClipMeta, size: int, skin: tuple[int, int, int],
                         background: tuple[int, int, int], identity: torch.Tensor, audio_layers: int,
                         audio_channels: int, rng: np.random.Generator) -> Path:
    """One prepared clip folder (frames, masks, embeddings, meta.json) of a synthetic cartoon face."""
    phase = float(rng.uniform(0, 2 * math.pi))
    faces = [_face_at(i, size, phase) for i in range(meta.num_frames)]
    frames_dir = folder / meta.frames_dir
    frames_dir.mkdir(parents=True, exist_ok=True)
    for i, face in enumerate(faces):
        image = _draw(face, size, skin, background, _EXPRESSION[meta.emotion], meta.intensity)
        cv2.imwrite(str(frames_dir / f"{i:05d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    face_rect, lip_rect = _face_rects(faces, size)
    cv2.imwrite(str(folder / meta.face_mask), rect_mask(face_rect, size, size))
    for relative, mask in zip((meta.pose_mask, meta.face_region_mask, meta.lip_mask),
                              separated_masks(face_rect, lip_rect, size, size)):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / relative), mask)
    torch.save(identity.clone(), folder / meta.face_emb)
    audio = torch.from_numpy(rng.standard_normal((meta.num_frames, audio_layers, audio_channels))).float()
    audio[:, :, 0] = torch.tensor([f.mouth_open for f in faces])[:, None] * 2 - 1
    torch.save(audio, folder / meta.audio_emb)
    save_clip_meta(meta, folder)
    return folder


def make_synthetic_dataset(root: str | Path, size: int = 64, frames: int = 24, seed: int = 0,
                           net_config: NetConfig | None = None, texts_per_clip: int = 2) -> list[Path]:
    """Write the synthetic prepared dataset under `root`; returns the clip folders."""
    root = Path(root)
    config = net_config or NetConfig.tiny()
    rng = np.random.default_rng(seed)
    texts = TemplateTextGenerator(seed=seed)
    folders = []
    for identity, clips in _CLIPS:
        skin = tuple(int(v) for v in rng.integers(120, 240, 3))
        background = tuple(int(v) for v in rng.integers(0, 90, 3))
        embedding = torch.from_numpy(rng.standard_normal(config.face_projection.identity_dim)).float()
        has_neutral = any(emotion == "neutral" for emotion, _ in clips)
        for emotion, intensity in clips:
            clip_id = f"{identity}_{emotion}_{intensity}"
            link = None if emotion == "neutral" or not has_neutral else f"{identity}_neutral_1"
            meta = ClipMeta(clip_id=clip_id, identity=identity, emotion=emotion, intensity=intensity,
                            texts=tuple(texts(emotion, intensity, texts_per_clip)), num_frames=frames,
                            neutral_video=link, source="synthetic")
            folders.append(write_synthetic_clip(root / clip_id, meta, size, skin, background, embedding,
                                                config.audio_projection.layers,
                                                config.audio_projection.channels, rng))
    return folders


# ---- synthetic talking-head videos ---------------------------------------------------------------

# Each identity's clips carry the source of the data phase they stand in for (progressive training).
VIDEO_SOURCES = {"id0": "synthetic-mead", "id1": "synthetic-hdtf", "id2": "synthetic-wild"}
_SENTENCES = (
    "The weather is lovely today.", "I cannot believe what just happened.", "Please bring me the blue box.",
    "We will meet again tomorrow morning.", "Nobody told me about the party.", "Look at all these flowers.",
    "That was the last train home.", "My brother plays the piano.",
)


@dataclass(frozen=True)
class SyntheticVideo:
    """A written synthetic video and its label for :meth:`training.data.prepare.Preparer.prepare`."""

    path: Path
    label: ClipLabel


def mouth_openings(waveform: np.ndarray, sample_rate: int, frames: int, fps: int = FPS) -> np.ndarray:
    """(frames,) mouth opening in [0, 1] per video frame: the RMS loudness of the speech during the frame,
    relative to the loudest frame (silence: closed)."""
    per_frame = sample_rate / fps
    rms = np.zeros(frames, np.float32)
    for i in range(frames):
        chunk = waveform[int(i * per_frame):int((i + 1) * per_frame)]
        rms[i] = float(np.sqrt(np.mean(np.square(chunk)))) if chunk.size else 0.0
    peak = float(rms.max())
    return rms / peak if peak > 0 else rms


def write_synthetic_video(path: str | Path, sentence: str, size: int, frames: int, skin: tuple[int, int, int],
                          background: tuple[int, int, int], emotion: str, intensity: int,
                          phase: float) -> Path:
    """An MP4 (25 fps, H.264 + AAC) of a cartoon face saying `sentence` (eSpeak NG) with `emotion`."""
    sample_rate = SAMPLE_RATE
    speech = synthesize_speech(sentence, sample_rate)[: int(frames * sample_rate / FPS)]
    openings = mouth_openings(speech, sample_rate, frames)
    images = np.stack([
        _draw(replace(_face_at(i, size, phase), mouth_open=float(openings[i])), size, skin, background,
              _EXPRESSION[emotion], intensity)
        for i in range(frames)])
    clip = AudioClip(torch.from_numpy(speech.copy())[None], sample_rate)
    return write_video(path, images, fps=FPS, audio=clip, preset="ultrafast")


def make_synthetic_videos(folder: str | Path, size: int = 64, frames: int = 24,
                          seed: int = 0) -> list[SyntheticVideo]:
    """Write one talking-head MP4 per clip of the synthetic identities under `folder`, each saying another
    sentence; returns them with their labels (source per identity: :data:`VIDEO_SOURCES`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    videos = []
    for identity, clips in _CLIPS:
        skin = tuple(int(v) for v in rng.integers(120, 240, 3))
        background = tuple(int(v) for v in rng.integers(0, 90, 3))
        for emotion, intensity in clips:
            clip_id = f"{identity}_{emotion}_{intensity}"
            sentence = _SENTENCES[len(videos) % len(_SENTENCES)]
            path = write_synthetic_video(folder / f"{clip_id}.mp4", sentence, size, frames, skin, background,
                                         emotion, intensity, float(rng.uniform(0, 2 * math.pi)))
            videos.append(SyntheticVideo(path, ClipLabel(clip_id, identity, emotion, intensity,
                                                         VIDEO_SOURCES[identity])))
    return videos


def prepare_videos(videos: list[SyntheticVideo], out_root: str | Path, model_folder: str | Path,
                   face_every: int = 2) -> list[PreparedClip]:
    """Prepare the videos with the model folder's face_analysis and wav2vec2 (clips already prepared under
    `out_root` are kept, so that a rerun resumes), then link every emotional clip to a neutral one."""
    out_root, model_folder = Path(out_root), Path(model_folder)
    preparer = Preparer(FaceAnalyzer.from_folder(model_folder / "face_analysis"),
                        Wav2Vec2AudioEncoder.from_pretrained(model_folder / "wav2vec2"),
                        PrepareSettings(face_every=face_every, texts_per_clip=2))
    report = prepare_all(preparer, [(video.path, video.label) for video in videos], out_root)
    if report.failed:
        raise RuntimeError(f"the synthetic videos should all prepare:\n{report.summary()}")
    clips = discover_clips([out_root])
    link_neutral_videos(clips)
    return discover_clips([out_root])


# ---- the smoke run -------------------------------------------------------------------------------

@dataclass
class SmokeResult:
    stage1_checkpoint: Path
    stage2_checkpoint: Path
    phase_checkpoints: list[Path]  # the progressive phases' last checkpoints; the last one is the result
    model_folder: Path  # a complete tiny model folder holding the final net as emocast.safetensors
    losses: dict[str, list[float]]  # per run ("stage1", "stage2", "phase 1-generalisation", ...)

    @property
    def final_checkpoint(self) -> Path:
        return self.phase_checkpoints[-1]


# (name, sources) of the smoke run's progressive phases: every source, then two, then one.
SMOKE_PHASES = (
    ("generalisation", ()),
    ("emotion-refinement", (VIDEO_SOURCES["id0"], VIDEO_SOURCES["id1"])),
    ("lip-sync", (VIDEO_SOURCES["id1"],)),
)


def smoke_config(stage: int, out: Path, steps: int, size: int, frames: int) -> StageConfig:
    models = out / "models"
    model = {"config": "tiny", "vae": str(models / "vae"), "clip": str(models / "clip")}
    if stage == 2:
        model["stage1_checkpoint"] = str(out / "stage1" / f"net-{steps}.safetensors")
    return config_from_dict({
        "stage": stage,
        "model": model,
        "data": {"roots": [str(out / "data")], "batch_size": 2, "size": size, "num_workers": 0,
                 "sample_margin": 4, "frames": frames, "motion_frames": 2, "audio_margin": 2},
        "solver": {"max_train_steps": steps, "learning_rate": 1.0e-4},
        "output": {"dir": str(out / f"stage{stage}"), "checkpointing_steps": steps, "log_every": 1},
        "device": "cpu",
        "seed": 0,
    }, where=f"smoke stage {stage}")


def smoke_progressive_config(out: Path, start: Path, steps: int, size: int, frames: int) -> ProgressiveConfig:
    """The three smoke phases, `steps` each, continuing from the stage-2 checkpoint `start`; the base
    stage-2 YAML is written to `out/progressive/stage2.yaml`."""
    base = smoke_config(2, out, steps, size, frames)
    base.model.init_checkpoint = str(start)
    base_file = out / "progressive" / "stage2.yaml"
    base_file.parent.mkdir(parents=True, exist_ok=True)
    base_file.write_text(yaml.safe_dump(base.to_dict(), sort_keys=False), encoding="utf-8")
    config = ProgressiveConfig(str(base_file), str(out / "progressive"),
                               [Phase(name, steps, sources=list(sources)) for name, sources in SMOKE_PHASES])
    config.validate()
    return config


def run_smoke(out: str | Path, steps: int = 3, size: int = 64, frames: int = 6,
              phase_steps: int = 2) -> SmokeResult:
    """The whole chain on tiny models: synthetic talking-head videos -> prepared clips -> `steps` steps of
    stage 1 and of stage 2 -> three progressive phases of `phase_steps` steps. The final checkpoint is
    checked against the tiny layout and installed as `out/models/emocast.safetensors`. Rerunning with the
    same `out` resumes: prepared clips are kept and finished runs are skipped."""
    out = Path(out)
    models = write_tiny_models(out / "models")
    videos = make_synthetic_videos(out / "videos", size=size, frames=max(24, frames + 8))
    clips = prepare_videos(videos, out / "data", models)
    logger.info("smoke run: %d videos prepared into %s", len(clips), out / "data")
    first = train(smoke_config(1, out, steps, size, frames))
    second = train(smoke_config(2, out, steps, size, frames))
    progressive = smoke_progressive_config(out, second.checkpoint, phase_steps, size, frames)
    phases = run_progressive(progressive)
    final = phases[-1].checkpoint
    check_layout(final, read_layout(final), NetConfig.tiny())
    load_net(final)  # the inference loader takes it as it is
    shutil.copyfile(final, models / "emocast.safetensors")
    logger.info("smoke run done: %s", models / "emocast.safetensors")
    losses = {"stage1": first.losses, "stage2": second.losses}
    for index, (phase, result) in enumerate(zip(progressive.phases, phases), start=1):
        losses[f"phase {index}-{phase.name}"] = result.losses
    return SmokeResult(first.checkpoint, second.checkpoint, [r.checkpoint for r in phases], models, losses)
