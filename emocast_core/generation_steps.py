"""The generation steps: face, speech and emotion encoded separately, then prepared and sampled.

`pipeline.generate` runs every step from one request. Graph front-ends (the ComfyUI nodes) run each
encoding in its own step so that changing one input (or only the seed) does not redo the others: every
`encode_*` function returns a small bundle that `prepare` combines into the sampler's input. `sample`
(all frames at once) and `sample_clips` (clip by clip, for writing as they come) both start with
`prepare`, so every path checks the same things; with the same inputs they give exactly the frames of
`pipeline.generate`.

The emotion can be encoded before the video length is known: `encode_emotion` runs the text encoder on
every prompt of the timeline once, and `EncodedEmotion.schedule` lays the stored embeddings out over
the frames later (the library's `build_emotion_schedule` does both, fed from a lookup table).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch

from .emotion import EmotionKey, EmotionSchedule, build_emotion_schedule, check_blend_options, parse_emotion_timeline
from .preprocess.audio import AudioClip
from .preprocess.audio_features import AudioFeatures, extract_audio_features
from .preprocess.face import PreparedFace, prepare_face
from .rates import FPS
from .runtime import EmoCASTModels
from .sampling import Progress, SamplerInputs, check_clip_length, iter_clips
from .sampling_settings import SamplingSettings, check_size

log = logging.getLogger("emocast_core.generation_steps")

__all__ = ["EncodedAudio", "EncodedEmotion", "EncodedFace", "GenerationResult", "PromptTable", "encode_audio",
           "check_settings", "encode_emotion", "encode_face", "prepare", "sample", "sample_clips", "trim_audio"]


@dataclass
class GenerationResult:
    frames: torch.Tensor  # (T, 3, H, W) float32 in [0, 1]
    audio: AudioClip  # the input speech cut to exactly T / fps seconds
    fps: int
    face: PreparedFace

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]


def trim_audio(audio: AudioClip, num_frames: int, fps: int = FPS) -> AudioClip:
    """The speech cut (or zero-padded) to exactly num_frames / fps seconds."""
    samples = round(num_frames * audio.sample_rate / fps)
    wave = audio.waveform[:, :samples]
    if wave.shape[1] < samples:
        wave = torch.nn.functional.pad(wave, (0, samples - wave.shape[1]))
    return AudioClip(wave.contiguous(), audio.sample_rate)


@dataclass(frozen=True)
class EncodedFace:
    """The prepared portrait plus the size of the image it came from (for pasting the face back)."""

    prepared: PreparedFace
    image_size: tuple[int, int]  # (width, height) of the original portrait

    @property
    def size(self) -> int:
        """Side of the square frames generated from this face."""
        return int(self.prepared.reference.shape[-1])


@dataclass(frozen=True)
class EncodedAudio:
    """The speech as given (kept for the output track) and its wav2vec2 features padded to whole clips."""

    clip: AudioClip
    features: AudioFeatures

    @property
    def num_frames(self) -> int:
        return self.features.num_frames

    @property
    def clip_length(self) -> int:
        return self.features.clip_length


class PromptTable:
    """A `PromptEncoder` over embeddings computed earlier; asking for any other prompt is an error."""

    def __init__(self, embeddings: Mapping[str, torch.Tensor]) -> None:
        self._embeddings = embeddings

    def encode(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in prompts if p not in self._embeddings]
        if missing:
            raise KeyError(f"prompt(s) {missing} were not encoded by encode_emotion; encode the emotion text again")
        return torch.cat([self._embeddings[p] for p in prompts])


class _RecordingEncoder:
    """Wraps the text encoder and keeps every embedding it produces (on the CPU, where bundles live)."""

    def __init__(self, encoder: object) -> None:
        self._encoder = encoder
        self.embeddings: dict[str, torch.Tensor] = {}

    def encode(self, prompts: list[str]) -> torch.Tensor:
        out = self._encoder.encode(prompts)
        for prompt, row in zip(prompts, out):
            self.embeddings[prompt] = row[None].detach().cpu()
        return out


@dataclass(frozen=True)
class EncodedEmotion:
    """An emotion prompt or timeline with the text embeddings of every prompt it needs."""

    text: str
    keys: tuple[EmotionKey, ...]
    crossfade: float
    strength: float
    embeddings: Mapping[str, torch.Tensor]

    def schedule(self, num_frames: int, fps: float = FPS) -> EmotionSchedule:
        """The per-frame emotion of a video of `num_frames` frames (no text encoder needed)."""
        return build_emotion_schedule(PromptTable(self.embeddings), self.text, num_frames, fps=fps,
                                      crossfade=self.crossfade, strength=self.strength)


def check_settings(settings: SamplingSettings, size: int, emotion: str, crossfade: float, strength: float) -> None:
    """Everything about a generation that can be wrong before any model is loaded or input encoded: the
    sampler settings, the frame size, the emotion text's timeline syntax, cross-fade and strength. Front-ends
    call this first, so a typo costs no model loading."""
    settings.validate()
    check_size(size)
    parse_emotion_timeline(emotion)
    check_blend_options(crossfade, strength)


def encode_face(models: EmoCASTModels, image: np.ndarray, size: int = 512, crop: bool = True) -> EncodedFace:
    """Portrait (H, W, 3) RGB uint8 -> face conditioning at `size` x `size` (see `prepare_face`)."""
    check_size(size)
    face = prepare_face(image, models.face_analyzer, size=size, crop=crop)
    height, width = image.shape[:2]
    return EncodedFace(face, (int(width), int(height)))


def encode_audio(models: EmoCASTModels, clip: AudioClip, clip_length: int = SamplingSettings.clip_length,
                 separate_vocals: bool = True) -> EncodedAudio:
    """Speech -> (vocals, when the models have a separator and `separate_vocals`) -> wav2vec2 features
    padded to whole clips of `clip_length` frames (the sampler's clip)."""
    separator = models.separator if separate_vocals else None
    features = extract_audio_features(clip, models.audio_encoder, clip_length, separator=separator, fps=FPS)
    return EncodedAudio(clip, features)


def encode_emotion(models: EmoCASTModels, text: str, crossfade: float = 0.5, strength: float = 1.0) -> EncodedEmotion:
    """Parse and check the prompt / timeline and encode each prompt it uses, once.

    The check is a real `build_emotion_schedule` call on a one-frame video, so a bad timeline, a
    prompt longer than CLIP's 77 tokens or a bad crossfade / strength is reported here, not at sampling.
    """
    recorder = _RecordingEncoder(models.text_encoder)
    build_emotion_schedule(recorder, text, 1, fps=FPS, crossfade=crossfade, strength=strength)
    keys = tuple(parse_emotion_timeline(text))
    return EncodedEmotion(text, keys, float(crossfade), float(strength), MappingProxyType(recorder.embeddings))


def prepare(models: EmoCASTModels, face: EncodedFace, audio: EncodedAudio, emotion: EncodedEmotion,
            settings: SamplingSettings) -> SamplerInputs:
    """Check the settings against the encoded inputs and assemble the sampler's input (every sampling path
    starts here)."""
    settings.validate()
    check_clip_length(audio.features, settings)
    f = face.prepared
    cond = SamplerInputs(
        reference=f.reference, face_region=f.face_region, identity=f.identity,
        masks=[f.masks.pose, f.masks.face, f.masks.lip],
        audio=audio.features,
        num_frames=audio.num_frames, emotion=emotion.schedule(audio.num_frames))
    duration = audio.num_frames / FPS
    late = [f"{key.time:g} s" for key in emotion.keys if key.time >= duration]
    if late:
        log.warning("the emotion timeline's key(s) at %s start after the end of the speech (%.2f s) and are not "
                    "used; shorten the timeline or use a longer recording", ", ".join(late), duration)
    log.info("generating %d frames (%d clips of %d) at %dx%d, %d steps, cfg %.2f, %s on %s", cond.num_frames,
             audio.features.num_clips, settings.clip_length, face.size, face.size, settings.steps, settings.cfg,
             str(models.dtype).removeprefix("torch."), models.device)
    return cond


def sample_clips(models: EmoCASTModels, face: EncodedFace, audio: EncodedAudio, emotion: EncodedEmotion,
                 settings: SamplingSettings, progress: Callable[[Progress], None] | None = None,
                 cancel: Callable[[], bool] | None = None) -> Iterator[torch.Tensor]:
    """The video clip by clip, each (frames, 3, H, W) float32 in [0, 1] on the CPU (see `sampling.iter_clips`)."""
    cond = prepare(models, face, audio, emotion, settings)
    return iter_clips(models.net, models.vae, models.scheduler, cond, settings, device=models.device,
                      dtype=models.dtype, progress=progress, cancel=cancel)


def sample(models: EmoCASTModels, face: EncodedFace, audio: EncodedAudio, emotion: EncodedEmotion,
           settings: SamplingSettings, progress: Callable[[Progress], None] | None = None,
           cancel: Callable[[], bool] | None = None) -> GenerationResult:
    """Generate the video frames and the speech cut to them (see `pipeline.generate`)."""
    frames = torch.cat(list(sample_clips(models, face, audio, emotion, settings, progress, cancel)))
    return GenerationResult(frames, trim_audio(audio.clip, frames.shape[0]), FPS, face.prepared)
