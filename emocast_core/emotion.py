"""Emotion-text conditioning: CLIP text embeddings of the emotion prompt, per video frame.

The official model (docs/model.md §4.7, §5.4–5.5; docs/release_quirks.md §4, §11) encodes one emotion prompt with the CLIP-L text
tower and uses it twice: as the 77 text tokens of the spatial cross-attention (the unconditional CFG half
gets CLIP("") there), and as the per-frame queries of the emotive audio attention (both CFG halves get the
prompt). We generalise the single prompt to a timeline of prompts, e.g.
``"0: calm and friendly | 4.0: suddenly furious | 9.5: sad"``, blended per frame; a plain prompt
reproduces the official tensors bit for bit.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from .rates import FPS

_WEIGHT_SNAP = 1e-9  # blend weights this close to 0 or 1 are rounding noise of the frame times

TEXT_TOKENS = 77  # CLIP's context length; the official call pads to it and never truncates
UNCOND_PROMPT = ""  # the official unconditional text

# "<seconds>: <prompt>"; the time accepts an optional sign so that negative times get a specific error.
_TIMED_SEGMENT = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*s?\s*:(.*)$", re.DOTALL)


class PromptEncoder(Protocol):
    """Anything that turns prompts into (n, 77, width) text embeddings (``EmotionTextEncoder`` does)."""

    def encode(self, prompts: list[str]) -> torch.Tensor: ...


class EmotionTextEncoder:
    """CLIP tokenizer + text model, called exactly as the official pipeline calls them."""

    def __init__(self, tokenizer: CLIPTokenizer, text_model: CLIPTextModel) -> None:
        positions = text_model.config.max_position_embeddings
        if positions < TEXT_TOKENS:
            raise ValueError(f"the text model has {positions} positions; EmoCAST needs a CLIP text model "
                             f"with at least {TEXT_TOKENS} (CLIP-L: openai/clip-vit-large-patch14)")
        self.tokenizer = tokenizer
        self.text_model = text_model

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "EmotionTextEncoder":
        """Load from a local folder: either one folder with the tokenizer and text-model files
        (``config.json``, weights, ``vocab.json``, ``merges.txt``) or a diffusers-style folder with
        ``tokenizer/`` and ``text_encoder/`` sub-folders. Nothing is downloaded."""
        tokenizer_dir, model_dir = _resolve_clip_folders(Path(folder))
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        # Loaded in fp32 and cast afterwards, as the official script does.
        text_model = CLIPTextModel.from_pretrained(str(model_dir), local_files_only=True)
        text_model = text_model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return cls(tokenizer, text_model)

    @property
    def device(self) -> torch.device:
        return next(self.text_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.text_model.parameters()).dtype

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``last_hidden_state`` (n, 77, width) of the prompts, padded to 77 tokens, never truncated.

        The tokenizer's attention mask goes to the text model, so padding tokens are not attended to
        inside CLIP (the official call passes it; leaving it out changes every token's embedding)."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError("encode() takes a list of prompt strings, e.g. encode(['calm'])")
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise TypeError(f"prompts must be strings, got {type(prompt).__name__}")
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=TEXT_TOKENS, truncation=False)
        for prompt, ids in zip(prompts, tokens["input_ids"]):
            if len(ids) > TEXT_TOKENS:
                raise ValueError(
                    f"emotion prompt {_preview(prompt)} has {len(ids)} tokens (including the start and end "
                    f"tokens) but the CLIP text encoder takes at most {TEXT_TOKENS}; shorten it by at least "
                    f"{len(ids) - TEXT_TOKENS} tokens")
        input_ids = torch.tensor(tokens["input_ids"], dtype=torch.long, device=self.device)
        attention_mask = torch.tensor(tokens["attention_mask"], dtype=torch.long, device=self.device)
        with torch.no_grad():
            output = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return output.last_hidden_state


def _resolve_clip_folders(folder: Path) -> tuple[Path, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"CLIP text-encoder folder {folder} does not exist")
    if (folder / "tokenizer").is_dir() and (folder / "text_encoder").is_dir():
        tokenizer_dir, model_dir = folder / "tokenizer", folder / "text_encoder"
    else:
        tokenizer_dir = model_dir = folder
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP text model in {folder}: expected config.json + model weights there "
                                "or in a text_encoder/ sub-folder (e.g. openai/clip-vit-large-patch14)")
    if not (tokenizer_dir / "vocab.json").is_file():
        raise FileNotFoundError(f"no CLIP tokenizer in {folder}: expected vocab.json and merges.txt there or "
                                "in a tokenizer/ sub-folder")
    return tokenizer_dir, model_dir


def _preview(prompt: str, limit: int = 60) -> str:
    return repr(prompt if len(prompt) <= limit else prompt[:limit] + "...")


# ---- timeline ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmotionKey:
    """From ``time`` (seconds) on, the emotion is ``prompt``."""

    time: float
    prompt: str


def parse_emotion_timeline(text: str) -> list[EmotionKey]:
    """Parse ``"0: calm and friendly | 4.0: suddenly furious | 9.5: sad"`` into keys.

    Segments are separated by ``|`` or new lines (blank lines are ignored); each is ``<seconds>: <prompt>``
    (an ``s`` after the number is allowed). A text without ``|`` and without any time, e.g. ``"happy"`` or
    ``"mood: happy"`` (only a number before the first colon makes a time), is one key at 0 s, new lines
    included. Times must be finite, >= 0 and strictly increasing; prompts must not be empty. Only the
    first colon of a segment separates the time.
    """
    if not isinstance(text, str):
        raise TypeError(f"the emotion timeline must be a string, got {type(text).__name__}")
    if not text.replace("|", "").strip():
        raise ValueError("the emotion prompt is empty; describe the emotion, e.g. 'calm and friendly'")
    segments = _split_segments(text)
    if "|" not in text and not any(_TIMED_SEGMENT.match(s) for s in segments):
        return [EmotionKey(0.0, text.strip())]  # a plain (possibly multi-line) prompt
    keys = [_parse_segment(segment, number) for number, segment in enumerate(segments, start=1)]
    validate_emotion_keys(keys)
    return keys


def _split_segments(text: str) -> list[str]:
    """Non-blank lines of every ``|``-separated piece; a blank piece is an error (blank lines are not)."""
    segments: list[str] = []
    for number, piece in enumerate(text.split("|"), start=1):
        lines = [line.strip() for line in piece.splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"emotion timeline part {number} is empty (two '|' in a row, or a '|' at the "
                             "start or end); write '<seconds>: <prompt>' between the separators")
        segments.extend(lines)
    return segments


def _parse_segment(segment: str, number: int) -> EmotionKey:
    match = _TIMED_SEGMENT.match(segment)
    if match is None:
        raise ValueError(f"emotion timeline segment {number} {_preview(segment)} has no time; write "
                         "'<seconds>: <prompt>', e.g. '4.0: suddenly furious'")
    return EmotionKey(float(match.group(1)), match.group(2).strip())


def validate_emotion_keys(keys: Sequence[EmotionKey]) -> None:
    """Raise ValueError unless the keys have finite, non-negative, strictly increasing times and prompts."""
    if not keys:
        raise ValueError("the emotion timeline has no keys; give at least one prompt")
    previous = None
    for number, key in enumerate(keys, start=1):
        if not isinstance(key.prompt, str) or not key.prompt.strip():
            raise ValueError(f"emotion key {number} (at {key.time} s) has an empty prompt; describe the "
                             "emotion, e.g. '4.0: suddenly furious'")
        if not math.isfinite(key.time):
            raise ValueError(f"emotion key {number} has time {key.time}; times must be finite seconds")
        if key.time < 0:
            raise ValueError(f"emotion key {number} has a negative time ({key.time} s); times start at 0")
        if previous is not None and key.time <= previous:
            raise ValueError(f"emotion key {number} at {key.time} s does not come after the previous key at "
                             f"{previous} s; list keys in strictly increasing time order")
        previous = key.time


# ---- per-frame schedule -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmotionSchedule:
    """Emotion text embeddings for a whole video.

    ``per_frame`` (num_frames, 77, width): the emotion of every output frame; it feeds the emotive audio
    attention, which takes one embedding per frame (official: the prompt repeated, in both CFG halves).
    For a single prompt it is a broadcast (expanded) view of ``prompt_embedding``: read it, don't write it.
    ``prompt_embedding`` (num_keys, 77, width): each key's embedding (after the strength blend), in key
    order; for a plain prompt this is exactly the official ``emo_text`` (1, 77, width).
    ``uncond`` (1, 77, width): CLIP("") — the unconditional half of the spatial text tokens.
    """

    per_frame: torch.Tensor
    prompt_embedding: torch.Tensor
    uncond: torch.Tensor
    keys: tuple[EmotionKey, ...]
    fps: float

    def __post_init__(self) -> None:
        if self.per_frame.ndim != 3 or self.per_frame.shape[0] == 0:
            raise ValueError("per_frame must be (num_frames > 0, tokens, width), "
                             f"got {tuple(self.per_frame.shape)}")
        if self.uncond.shape != (1, *self.per_frame.shape[1:]):
            raise ValueError(f"uncond must be (1, {self.per_frame.shape[1]}, {self.per_frame.shape[2]}), "
                             f"got {tuple(self.uncond.shape)}")

    @property
    def num_frames(self) -> int:
        return self.per_frame.shape[0]

    def for_clip(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(spatial (1, 77, w), per_frame (length, 77, w))`` for the clip of frames start..start+length-1.

        The spatial cross-attention takes one text embedding per clip; we use the clip's middle frame
        (``start + length // 2``). With a single prompt every frame is the prompt, so this is the official
        tensor bit for bit, whereas a mean over frames would not be (float summation rounds), and at a hard
        cut the middle frame picks one emotion instead of blending both. Frames past the end of the video
        (the sampler pads the last clip, then discards those frames) repeat the last frame.
        """
        if start < 0 or length < 1:
            raise ValueError(f"a clip needs start >= 0 and length >= 1, got start={start}, length={length}")
        if start >= self.num_frames:
            raise ValueError(f"clip start {start} is past the video's {self.num_frames} frames")
        index = torch.arange(start, start + length).clamp(max=self.num_frames - 1)
        per_frame = self.per_frame[index.to(self.per_frame.device)]
        middle = length // 2
        return per_frame[middle:middle + 1].clone(), per_frame

    def to(self, device: str | torch.device | None = None,
           dtype: torch.dtype | None = None) -> "EmotionSchedule":
        """A copy with every tensor moved/cast (e.g. to the sampler's device and fp16)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)
        return EmotionSchedule(move(self.per_frame), move(self.prompt_embedding), move(self.uncond),
                               self.keys, self.fps)


def build_emotion_schedule(encoder: PromptEncoder, timeline_or_prompt: str | Sequence[EmotionKey],
                           num_frames: int, fps: float = FPS, crossfade: float = 0.5,
                           strength: float = 1.0,
                           neutral_prompt: str = UNCOND_PROMPT) -> EmotionSchedule:
    """Encode the emotion timeline (or a plain prompt) and give every frame its embedding.

    Frame ``f`` is at ``f / fps`` seconds. The emotion of key k starts changing *at* its time ``T_k`` and
    reaches it ``crossfade`` seconds later, blending linearly from the previous key's embedding (so at
    ``T_k`` the frame is still the previous emotion; with ``crossfade=0`` it switches at ``T_k``). When the
    next key comes sooner than ``crossfade``, the change is shortened to end at that key, so every blend
    starts from a pure key emotion. Frames before the first key hold the first key's emotion.

    ``strength`` (experimental) scales the emotion in embedding space: each key becomes
    ``neutral + strength * (key - neutral)`` with ``neutral = CLIP(neutral_prompt)`` (default CLIP("")),
    0 giving the neutral text, > 1 exaggerating. At exactly 1.0 nothing is computed, so the official
    embeddings come through bit-identical. Each distinct prompt is encoded once, alone (batch of 1, as the
    official pipeline does, so batching cannot change its bits).
    """
    keys = (parse_emotion_timeline(timeline_or_prompt) if isinstance(timeline_or_prompt, str)
            else list(timeline_or_prompt))
    validate_emotion_keys(keys)
    _check_schedule_args(num_frames, fps, crossfade, strength)

    encoded: dict[str, torch.Tensor] = {}

    def embed(prompt: str) -> torch.Tensor:
        if prompt not in encoded:
            encoded[prompt] = encoder.encode([prompt])
        return encoded[prompt]

    uncond = embed(UNCOND_PROMPT)
    key_embeddings = torch.cat([embed(key.prompt) for key in keys])
    if strength != 1.0:
        neutral = embed(neutral_prompt).float()
        key_embeddings = torch.lerp(neutral, key_embeddings.float(), strength).to(key_embeddings.dtype)

    if len(keys) == 1:
        per_frame = key_embeddings.expand(num_frames, -1, -1)
    else:
        source, target, weight = _blend_schedule([k.time for k in keys], num_frames, fps, crossfade)
        per_frame = _blend(key_embeddings, source, target, weight)
    return EmotionSchedule(per_frame, key_embeddings, uncond, tuple(keys), float(fps))


def _check_schedule_args(num_frames: int, fps: float, crossfade: float, strength: float) -> None:
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps}")
    check_blend_options(crossfade, strength)


def check_blend_options(crossfade: float, strength: float) -> None:
    """The timeline's cross-fade (seconds) and the emotion strength, checked without any model."""
    if not (math.isfinite(crossfade) and crossfade >= 0):
        raise ValueError(f"crossfade must be >= 0 seconds, got {crossfade}")
    if not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"emotion strength must be a finite number >= 0 (1.0 = as prompted), got {strength}")


def _blend_schedule(times: list[float], num_frames: int, fps: float,
                    crossfade: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per frame: the key blended from, the key blended to, and the weight of the latter in [0, 1]."""
    key_times = torch.tensor(times, dtype=torch.float64)
    frame_times = torch.arange(num_frames, dtype=torch.float64) / fps
    current = (torch.searchsorted(key_times, frame_times, right=True) - 1).clamp(min=0)
    # Each change lasts `crossfade`, shortened so that it is over by the next key's time.
    gaps = torch.cat([key_times[1:] - key_times[:-1], torch.tensor([math.inf], dtype=torch.float64)])
    duration = torch.minimum(gaps, torch.tensor(crossfade, dtype=torch.float64))[current]
    elapsed = frame_times - key_times[current]
    weight = torch.where(duration > 0, (elapsed / duration.clamp(min=1e-12)).clamp(0.0, 1.0),
                         torch.ones_like(elapsed))
    weight = torch.where(current == 0, torch.ones_like(weight), weight)  # before/at the first key: hold it
    # Seconds are not exact in binary (1.4 - 1.0 != 0.4): snap so the ends of a change are exact key copies.
    weight = torch.where(weight > 1 - _WEIGHT_SNAP, torch.ones_like(weight), weight)
    weight = torch.where(weight < _WEIGHT_SNAP, torch.zeros_like(weight), weight)
    source = (current - 1).clamp(min=0)
    return source, current, weight


def _blend(embeddings: torch.Tensor, source: torch.Tensor, target: torch.Tensor,
           weight: torch.Tensor) -> torch.Tensor:
    """Frames with weight 0 or 1 are exact copies of a key; only the frames inside a change are computed."""
    index = torch.where(weight == 0, source, target).to(embeddings.device)
    per_frame = embeddings[index]
    mixing = ((weight > 0) & (weight < 1)).to(embeddings.device)
    if mixing.any():
        w = weight.to(device=embeddings.device, dtype=torch.float32)[mixing].view(-1, 1, 1)
        mixed = torch.lerp(embeddings[source.to(embeddings.device)[mixing]].float(),
                           embeddings[target.to(embeddings.device)[mixing]].float(), w)
        per_frame[mixing] = mixed.to(embeddings.dtype)
    return per_frame
