"""Clip metadata of the prepared training data and the emotive text descriptions (paper §3.3, ETTH).

A prepared dataset is a folder of clip folders; each clip folder holds ``meta.json`` (a :class:`ClipMeta`)
and the files it names, by default::

    <root>/<clip_id>/
        meta.json
        frames/*.png        video frames at 25 fps; frame i is the i-th file in sorted name order
        face_mask.png       union face box over all frames (0/255, frame resolution): FaceLocator input
        masks/pose.png      64x64 uint8 blurred masks of the emotive audio attention: background (pose),
        masks/face.png        face without lips (expression)
        masks/lip.png         and lips
        face_emb.pt         (512,) float32 ArcFace identity embedding (a tensor, read with weights_only)
        audio_emb.pt        (N, layers, channels) float wav2vec2 hidden states per video frame (stage 2 only)

The field names beyond Hallo's (``emotion``, ``intensity``, ``texts``, ``identity``, ``neutral_video``)
are ours: the official ones are unknown (docs/model.md §6.6).
"""
from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

from emocast_core.rates import FPS

logger = logging.getLogger(__name__)

# The 8 MEAD emotions, in MEAD's order (neu, hap, sad, sur, fea, dis, ang, con).
EMOTIONS = ("neutral", "happy", "sad", "surprised", "fear", "disgusted", "angry", "contempt")
NEUTRAL = "neutral"
MEAD_CODES = dict(zip(("neu", "hap", "sad", "sur", "fea", "dis", "ang", "con"), EMOTIONS))
_EMOTION_ALIASES = {
    **MEAD_CODES,
    "happiness": "happy", "sadness": "sad", "surprise": "surprised", "fearful": "fear", "afraid": "fear",
    "disgust": "disgusted", "anger": "angry", "contemptuous": "contempt", "calm": "neutral",
}
INTENSITIES = (1, 2, 3)  # MEAD levels: weak, medium, strong

META_FILE = "meta.json"
META_VERSION = 1
# Built-in descriptions stay ASCII and this short so that they fit in CLIP's 77 tokens with any tokenizer,
# the byte-level test tokenizer included.
MAX_TEXT_CHARS = 75


def normalize_emotion(label: str) -> str:
    """A MEAD emotion name from a name, MEAD code or common alias ("Anger", "ang", "surprise")."""
    if not isinstance(label, str):
        raise TypeError(f"emotion label must be a string, got {type(label).__name__}")
    key = label.strip().lower()
    if key in EMOTIONS:
        return key
    if key in _EMOTION_ALIASES:
        return _EMOTION_ALIASES[key]
    raise ValueError(f"unknown emotion {label!r}; use one of {', '.join(EMOTIONS)} "
                     f"(or a MEAD code: {', '.join(MEAD_CODES)})")


# ---- metadata ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClipMeta:
    """One prepared video clip. Paths are relative to the clip folder (absolute paths are allowed)."""

    clip_id: str
    identity: str
    emotion: str
    intensity: int = 1
    texts: tuple[str, ...] = ()
    num_frames: int = 0
    fps: int = FPS
    neutral_video: str | None = None  # clip_id of a neutral clip of the same identity
    source: str = ""  # originating dataset (MEAD, HDTF, ...), used to select data per training phase
    frames_dir: str = "frames"
    face_mask: str = "face_mask.png"
    pose_mask: str = "masks/pose.png"
    face_region_mask: str = "masks/face.png"
    lip_mask: str = "masks/lip.png"
    face_emb: str = "face_emb.pt"
    audio_emb: str | None = "audio_emb.pt"
    version: int = META_VERSION

    def __post_init__(self) -> None:
        if not self.clip_id or "/" in self.clip_id or "\\" in self.clip_id:
            raise ValueError(f"clip_id must be a non-empty name without path separators, got {self.clip_id!r}")
        if not self.identity:
            raise ValueError(f"clip {self.clip_id}: identity must not be empty")
        object.__setattr__(self, "emotion", normalize_emotion(self.emotion))
        if self.intensity not in INTENSITIES:
            raise ValueError(f"clip {self.clip_id}: intensity must be one of {INTENSITIES}, got {self.intensity!r}")
        if isinstance(self.texts, str):
            raise ValueError(f"clip {self.clip_id}: texts must be a list of descriptions, not one string")
        object.__setattr__(self, "texts", tuple(self.texts))
        if any(not isinstance(t, str) or not t.strip() for t in self.texts):
            raise ValueError(f"clip {self.clip_id}: every text description must be a non-empty string")
        if not isinstance(self.num_frames, int) or self.num_frames < 1:
            raise ValueError(f"clip {self.clip_id}: num_frames must be a positive integer, got {self.num_frames!r}")
        if self.fps <= 0:
            raise ValueError(f"clip {self.clip_id}: fps must be positive, got {self.fps}")
        if self.neutral_video == self.clip_id:
            raise ValueError(f"clip {self.clip_id}: neutral_video points to the clip itself")
        if self.version > META_VERSION:
            raise ValueError(f"clip {self.clip_id}: meta version {self.version} is newer than this code "
                             f"understands ({META_VERSION}); update the training code")

    @property
    def is_neutral(self) -> bool:
        return self.emotion == NEUTRAL

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["texts"] = list(self.texts)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "clip metadata") -> "ClipMeta":
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(known)}")
        missing = [name for name in ("clip_id", "identity", "emotion", "num_frames") if name not in data]
        if missing:
            raise ValueError(f"{where}: missing required field(s) {missing}")
        return cls(**dict(data))


@dataclass(frozen=True)
class PreparedClip:
    """A clip folder on disk and its metadata, with the referenced paths resolved."""

    folder: Path
    meta: ClipMeta

    def path(self, relative: str) -> Path:
        return Path(relative) if Path(relative).is_absolute() else self.folder / relative

    @property
    def frames_dir(self) -> Path:
        return self.path(self.meta.frames_dir)

    @property
    def face_mask(self) -> Path:
        return self.path(self.meta.face_mask)

    @property
    def region_masks(self) -> tuple[Path, Path, Path]:
        """(pose/background, face without lips, lip): the order of the UNet's (full, face, lip) masks."""
        m = self.meta
        return self.path(m.pose_mask), self.path(m.face_region_mask), self.path(m.lip_mask)

    @property
    def face_emb(self) -> Path:
        return self.path(self.meta.face_emb)

    @property
    def audio_emb(self) -> Path | None:
        return None if self.meta.audio_emb is None else self.path(self.meta.audio_emb)

    def frame_paths(self) -> list[Path]:
        """The frame files in sorted name order; their count must be ``meta.num_frames``."""
        if not self.frames_dir.is_dir():
            raise FileNotFoundError(f"clip {self.meta.clip_id}: frames folder {self.frames_dir} does not exist")
        frames = sorted(p for p in self.frames_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if len(frames) != self.meta.num_frames:
            raise ValueError(f"clip {self.meta.clip_id}: meta.json says {self.meta.num_frames} frames but "
                             f"{self.frames_dir} holds {len(frames)} images; re-run the preparation")
        return frames


def save_clip_meta(meta: ClipMeta, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / META_FILE
    path.write_text(json.dumps(meta.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def load_clip(folder: str | Path) -> PreparedClip:
    folder = Path(folder)
    path = folder / META_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} is not a prepared clip folder (no {META_FILE})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    meta = ClipMeta.from_dict(data, where=str(path))
    if meta.clip_id != folder.name:
        raise ValueError(f"{path}: clip_id {meta.clip_id!r} differs from its folder name {folder.name!r}")
    return PreparedClip(folder, meta)


def discover_clips(roots: Iterable[str | Path]) -> list[PreparedClip]:
    """Every clip folder (a sub-folder with ``meta.json``) under the given dataset roots, sorted by id."""
    roots = list(roots)
    clips: dict[str, PreparedClip] = {}
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset root {root} does not exist")
        for folder in sorted(p for p in root.iterdir() if (p / META_FILE).is_file()):
            clip = load_clip(folder)
            other = clips.get(clip.meta.clip_id)
            if other is not None:
                raise ValueError(f"clip id {clip.meta.clip_id!r} appears twice: {other.folder} and {folder}; "
                                 "clip ids must be unique across all dataset roots")
            clips[clip.meta.clip_id] = clip
    if not clips:
        raise ValueError(f"no prepared clips (sub-folders with {META_FILE}) under {[str(r) for r in roots]}")
    return [clips[k] for k in sorted(clips)]


# ---- emotive text descriptions -------------------------------------------------------------------

# Adjectives per emotion and intensity (1 weak .. 3 strong); neutral does not vary with intensity.
_ADJECTIVES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "neutral": (("neutral", "calm", "composed"),) * 3,
    "happy": (("slightly happy", "content", "pleased"), ("happy", "cheerful", "joyful"),
              ("overjoyed", "ecstatic", "extremely happy")),
    "sad": (("slightly sad", "wistful", "downcast"), ("sad", "unhappy", "sorrowful"),
            ("heartbroken", "devastated", "grief-stricken")),
    "surprised": (("mildly surprised", "curious", "slightly startled"), ("surprised", "amazed", "astonished"),
                  ("utterly astonished", "stunned", "shocked")),
    "fear": (("uneasy", "slightly nervous", "worried"), ("afraid", "scared", "fearful"),
             ("terrified", "panicked", "horrified")),
    "disgusted": (("mildly disgusted", "displeased", "put off"), ("disgusted", "repulsed", "grossed out"),
                  ("utterly revolted", "nauseated", "sickened")),
    "angry": (("annoyed", "irritated", "slightly angry"), ("angry", "mad", "indignant"),
              ("furious", "enraged", "livid")),
    "contempt": (("slightly dismissive", "mildly scornful", "unimpressed"),
                 ("contemptuous", "scornful", "disdainful"),
                 ("deeply contemptuous", "utterly scornful", "sneering")),
}
_LABEL_WORDS = {"fear": "fearful", "contempt": "contemptuous"}
_INTENSITY_WORDS = ("mild", "", "strong")

_ADJECTIVE_TEMPLATES = (
    "A person is talking, looking {adj}.",
    "A {adj} person is talking.",
    "The speaker sounds {adj}.",
    "Someone speaks in a {adj} way.",
    "The portrait talks and feels {adj}.",
    "A talking face that looks {adj}.",
)

# MMHead-style scene descriptions (paper §3.3), per emotion and intensity.
_SCENES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "neutral": (("The portrait reads the news in an even voice.",
                 "A person explains the weather forecast calmly.",
                 "The person describes their daily commute.",
                 "A person answers questions in a plain tone."),) * 3,
    "happy": (("The person just heard a mildly pleasant piece of news.",
               "A person chats about a nice sunny afternoon."),
              ("The portrait is telling a friend about a fun weekend trip.",
               "A person talks about getting a gift they wanted."),
              ("The person just won the lottery and is shouting with joy.",
               "The portrait celebrates passing a very hard exam.")),
    "sad": (("The person remembers a friend who moved far away.",
             "A person talks about a rainy, gloomy day."),
            ("The portrait is talking about losing a favourite pet.",
             "A person describes a failed exam with regret."),
            ("The person is crying at the funeral of a loved one.",
             "The portrait speaks after a painful breakup.")),
    "surprised": (("The person notices an unexpected message on the phone.",
                   "A person hears a mildly odd rumour."),
                  ("The portrait opens a door to a surprise party.",
                   "A person learns that a friend is getting married."),
                  ("The person sees a magician make a car vanish.",
                   "The portrait just witnessed something unbelievable.")),
    "fear": (("The person is nervous before a job interview.",
              "A person walks alone down a dim street."),
             ("The person hears strange footsteps behind them at night.",
              "The portrait talks while a storm shakes the house."),
             ("The portrait is watching a horror movie with jump scares.",
              "A person is being chased through a dark forest.")),
    "disgusted": (("The person smells milk that is slightly off.",
                   "A person looks at a messy, sticky table."),
                  ("The portrait finds a hair in the soup.",
                   "A person steps in something gross on the street."),
                  ("The person opens a bin full of rotting food.",
                   "The portrait watches someone eat live insects.")),
    "angry": (("The person is stuck in slow traffic.",
               "A person talks about a rude email from a colleague."),
              ("The portrait argues with someone who broke a promise.",
               "A person complains about being cheated in a shop."),
              ("The person is yelling at someone who wrecked their car.",
               "The portrait is enraged by a blatant betrayal.")),
    "contempt": (("The person listens to a boring, boastful speech.",
                  "A person hears a weak excuse for being late."),
                 ("The portrait mocks a rival's clumsy attempt.",
                  "A person talks down to an arrogant critic."),
                 ("The person sneers at a liar caught in the act.",
                  "The portrait looks down on a cheater with scorn.")),
}


def _label_sentence(emotion: str, intensity: int) -> str:
    word = _LABEL_WORDS.get(emotion, emotion)
    degree = "" if emotion == NEUTRAL else _INTENSITY_WORDS[intensity - 1]
    return f"A person is talking with {degree + ' ' if degree else ''}{word} emotion."


def _check_key(emotion: str, intensity: int) -> tuple[str, int]:
    emotion = normalize_emotion(emotion)
    if intensity not in INTENSITIES:
        raise ValueError(f"intensity must be one of {INTENSITIES}, got {intensity!r}")
    return emotion, intensity


class EmotiveTextBank:
    """Template descriptions per emotion x intensity: label sentences, adjective templates and scenes.

    ``extra`` adds phrasings, e.g. ones written by a language model, keyed by (emotion, intensity)."""

    def __init__(self, extra: Mapping[tuple[str, int], Sequence[str]] | None = None) -> None:
        self._extra: dict[tuple[str, int], tuple[str, ...]] = {}
        for (emotion, intensity), texts in (extra or {}).items():
            key = _check_key(emotion, intensity)
            self._extra[key] = self._extra.get(key, ()) + tuple(texts)

    def phrasings(self, emotion: str, intensity: int) -> tuple[str, ...]:
        emotion, intensity = _check_key(emotion, intensity)
        texts = [_label_sentence(emotion, intensity)]
        texts += [t.format(adj=adj) for adj in _ADJECTIVES[emotion][intensity - 1] for t in _ADJECTIVE_TEMPLATES]
        texts += _SCENES[emotion][intensity - 1]
        texts += self._extra.get((emotion, intensity), ())
        return tuple(dict.fromkeys(texts))

    def sample(self, emotion: str, intensity: int, rng: random.Random, count: int = 1) -> list[str]:
        """`count` distinct phrasings (fewer only if the bank holds fewer)."""
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        texts = self.phrasings(emotion, intensity)
        return rng.sample(texts, min(count, len(texts)))


class TextGenerator(Protocol):
    """Writes `count` emotive descriptions for an emotion label and intensity (the paper used ChatGPT)."""

    def __call__(self, emotion: str, intensity: int, count: int) -> list[str]: ...


@dataclass
class TemplateTextGenerator:
    """The built-in generator: draws from an :class:`EmotiveTextBank` with a seeded rng."""

    bank: EmotiveTextBank = field(default_factory=EmotiveTextBank)
    seed: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def __call__(self, emotion: str, intensity: int, count: int) -> list[str]:
        return self.bank.sample(emotion, intensity, self._rng, count)


_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*")


@dataclass
class LanguageModelTextGenerator:
    """Hook for an external language model: `complete(prompt) -> text` is any LLM call (API, local model).

    The model is asked for one description per line; list markers and quotes are stripped, and lines that
    are too long for CLIP or not plain ASCII are dropped (logged)."""

    complete: Callable[[str], str]
    max_chars: int = MAX_TEXT_CHARS

    def prompt(self, emotion: str, intensity: int, count: int) -> str:
        degree = ("weak", "medium", "strong")[intensity - 1]
        return (f"Write {count} different one-sentence descriptions of a person talking with {degree} "
                f"{emotion} emotion. Mix plain statements (e.g. 'A person is talking with happy emotion.') "
                f"with short scenes that cause the emotion (e.g. 'The portrait is watching a horror movie "
                f"with jump scares.'). At most {self.max_chars} characters each, one per line, no numbering.")

    def __call__(self, emotion: str, intensity: int, count: int) -> list[str]:
        emotion, intensity = _check_key(emotion, intensity)
        raw = self.complete(self.prompt(emotion, intensity, count))
        texts = []
        for line in raw.splitlines():
            text = _LIST_MARKER.sub("", line).strip().strip("\"'").strip()
            if not text:
                continue
            if len(text) > self.max_chars or not text.isascii():
                logger.info("dropping language-model description %r (longer than %d characters or not ASCII)",
                            text, self.max_chars)
                continue
            texts.append(text)
        if not texts:
            raise ValueError(f"the language model returned no usable description for {emotion}/{intensity}; "
                             f"its answer was: {raw[:200]!r}")
        return list(dict.fromkeys(texts))[:count]


def describe_clips(clips: Iterable[ClipMeta], generator: TextGenerator | None = None,
                   count: int = 4) -> list[ClipMeta]:
    """Copies of the clips with `count` descriptions each (built-in templates unless a generator is given);
    clips that already have descriptions keep them."""
    generator = generator if generator is not None else TemplateTextGenerator()
    return [meta if meta.texts else replace(meta, texts=tuple(generator(meta.emotion, meta.intensity, count)))
            for meta in clips]
