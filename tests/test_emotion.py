"""Emotion-text conditioning: official CLIP parity, timeline parsing and per-frame blending."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emocast_core.emotion import (
    TEXT_TOKENS,
    EmotionSchedule,
    EmotionKey,
    EmotionTextEncoder,
    build_emotion_schedule,
    parse_emotion_timeline,
)
from parity_fixture import PARITY_TINY, load_expected, load_inputs, text_encoder


@pytest.fixture(scope="module")
def parity() -> dict:
    expected = load_expected(PARITY_TINY)
    return {"folder": PARITY_TINY, "prompt": load_inputs(PARITY_TINY)["prompt"],
            # the official pipeline encodes, per clip, the prompt and then "": [cond, uncond, cond, uncond]
            "text": expected["intermediates"]["text_last_hidden_state"]}


@pytest.fixture(scope="module")
def encoder(parity: dict) -> EmotionTextEncoder:
    return text_encoder(parity["folder"])


class ConstantEncoder:
    """Each prompt encodes to a constant tensor, so blended frames have values we can predict exactly."""

    def __init__(self, values: dict[str, float], width: int = 8) -> None:
        self.values, self.width, self.calls = values, width, []

    def encode(self, prompts: list[str]) -> torch.Tensor:
        self.calls.append(list(prompts))
        return torch.stack([torch.full((TEXT_TOKENS, self.width), self.values[p]) for p in prompts])


# ---- CLIP text encoding ----------------------------------------------------------------------------------
def test_prompt_and_empty_text_match_official_encoding(encoder: EmotionTextEncoder, parity: dict) -> None:
    cond, uncond = encoder.encode([parity["prompt"]]), encoder.encode([""])
    assert cond.shape == uncond.shape == (1, TEXT_TOKENS, 768)
    assert len(parity["text"]) == 4
    for clip in range(2):
        assert (cond - parity["text"][2 * clip]).abs().max() <= 1e-5
        assert (uncond - parity["text"][2 * clip + 1]).abs().max() <= 1e-5
    assert (cond - uncond).abs().max() > 0.1  # the fixture tells the two apart


def test_batched_encoding_keeps_prompt_order(encoder: EmotionTextEncoder, parity: dict) -> None:
    both = encoder.encode([parity["prompt"], ""])
    assert both.shape == (2, TEXT_TOKENS, 768)
    assert torch.allclose(both[0], parity["text"][0][0], atol=1e-5)
    assert torch.allclose(both[1], parity["text"][1][0], atol=1e-5)


def test_tokenizer_attention_mask_reaches_text_model(encoder: EmotionTextEncoder, parity: dict,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    forward = encoder.text_model.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return forward(*args, **kwargs)

    monkeypatch.setattr(encoder.text_model, "forward", spy)
    encoded = encoder.encode([parity["prompt"]])
    tokens = encoder.tokenizer([parity["prompt"]], padding="max_length", max_length=TEXT_TOKENS)
    assert seen["attention_mask"].tolist() == tokens["attention_mask"]
    assert 2 < int(seen["attention_mask"].sum()) < TEXT_TOKENS  # padding is masked out

    # And the mask changes the result: without it (padding visible inside CLIP) the output differs.
    with torch.no_grad():
        unmasked = forward(input_ids=seen["input_ids"]).last_hidden_state
    assert (unmasked - encoded).abs().max() > 1e-2


def test_prompt_longer_than_77_tokens_is_rejected(encoder: EmotionTextEncoder) -> None:
    prompt = "furious " * 60
    count = len(encoder.tokenizer(prompt)["input_ids"])
    assert count > TEXT_TOKENS
    with pytest.raises(ValueError, match=rf"has {count} tokens .*at most 77; shorten it"):
        encoder.encode(["calm", prompt])


def test_missing_clip_folder_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EmotionTextEncoder.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no CLIP text model"):
        EmotionTextEncoder.from_pretrained(tmp_path)


# ---- timeline ---------------------------------------------------------------------------------------------
def test_timeline_parsing() -> None:
    assert parse_emotion_timeline("0: calm and friendly | 4.0: suddenly furious | 9.5: sad") == [
        EmotionKey(0.0, "calm and friendly"), EmotionKey(4.0, "suddenly furious"), EmotionKey(9.5, "sad")]
    assert parse_emotion_timeline("The portrait is happy.") == [EmotionKey(0.0, "The portrait is happy.")]
    assert parse_emotion_timeline("mood: happy") == [EmotionKey(0.0, "mood: happy")]
    assert parse_emotion_timeline("0: calm\n\n2.5s: angry: shouting\n") == [
        EmotionKey(0.0, "calm"), EmotionKey(2.5, "angry: shouting")]


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("0: calm || 2: sad", "part 2 is empty"),
    ("0: calm | 2: sad |", "part 3 is empty"),
    ("calm | sad", "segment 1 'calm' has no time"),
    ("0: calm | -1: sad", "negative time"),
    ("0: calm | 3: sad | 3: angry", "key 3 at 3.0 s does not come after"),
    ("2: calm | 1: sad", "does not come after"),
    ("0: calm | 2:   ", "key 2 .* empty prompt"),
    ("0: calm | 1e999: sad", "finite"),
])
def test_timeline_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_emotion_timeline(text)


# ---- per-frame conditioning -------------------------------------------------------------------------------
def test_per_frame_values_at_keys_and_inside_crossfades() -> None:
    enc = ConstantEncoder({"": 0.0, "calm": 1.0, "angry": 3.0, "sad": -1.0})
    # fps 10: frame f is at f/10 s. "angry" starts at 1.0 s and completes 0.4 s later; "sad" starts at
    # 1.6 s, only 0.2 s after that change ended, and the 0.4 s fade runs to the end (2.0 s).
    cond = build_emotion_schedule(enc, "0: calm | 1.0: angry | 1.6: sad", num_frames=22, fps=10,
                                  crossfade=0.4)
    expected = [1.0] * 11 + [1.5, 2.0, 2.5] + [3.0] * 3 + [2.0, 1.0, 0.0, -1.0, -1.0]
    values = cond.per_frame[:, 0, 0].tolist()
    assert values == pytest.approx(expected, abs=1e-6)
    assert cond.per_frame.shape == (22, TEXT_TOKENS, 8)
    assert torch.all(cond.per_frame == cond.per_frame[:, :1, :1])  # whole embeddings are blended
    assert cond.prompt_embedding[:, 0, 0].tolist() == [1.0, 3.0, -1.0]
    assert cond.uncond.shape == (1, TEXT_TOKENS, 8) and torch.all(cond.uncond == 0)


def test_crossfade_is_shortened_by_a_close_next_key_and_zero_is_a_cut() -> None:
    enc = ConstantEncoder({"": 0.0, "a": 0.0, "b": 4.0, "c": 8.0})
    # b starts at 0.2 s; c comes 0.2 s later, so b's 1 s fade is shortened to 0.2 s.
    cond = build_emotion_schedule(enc, "0: a | 0.2: b | 0.4: c", num_frames=5, fps=10, crossfade=1.0)
    assert cond.per_frame[:, 0, 0].tolist()[:5] == pytest.approx([0.0, 0.0, 0.0, 2.0, 4.0])
    cut = build_emotion_schedule(enc, "0: a | 0.2: b", num_frames=4, fps=10, crossfade=0.0)
    assert cut.per_frame[:, 0, 0].tolist() == [0.0, 0.0, 4.0, 4.0]


def test_frames_before_the_first_key_hold_it_and_prompts_are_encoded_once() -> None:
    enc = ConstantEncoder({"": 0.0, "calm": 1.0, "angry": 5.0})
    cond = build_emotion_schedule(enc, [EmotionKey(0.2, "calm"), EmotionKey(0.4, "angry"),
                                        EmotionKey(0.6, "calm")], num_frames=8, fps=10, crossfade=0.0)
    assert cond.per_frame[:, 0, 0].tolist() == [1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 1.0, 1.0]
    assert sorted(map(tuple, enc.calls)) == [("",), ("angry",), ("calm",)]  # one prompt per call, once each


def test_strength_blends_from_the_neutral_text() -> None:
    enc = ConstantEncoder({"": 0.0, "neutral face": 1.0, "angry": 3.0})
    half = build_emotion_schedule(enc, "angry", num_frames=3, strength=0.5)
    assert torch.all(half.per_frame == 1.5)
    custom = build_emotion_schedule(enc, "angry", num_frames=3, strength=2.0,
                                    neutral_prompt="neutral face")
    assert torch.all(custom.per_frame == 5.0)  # 1 + 2 * (3 - 1): extrapolation
    with pytest.raises(ValueError, match="strength"):
        build_emotion_schedule(enc, "angry", num_frames=3, strength=-0.5)


def test_strength_one_is_bit_identical_to_the_official_embedding(encoder: EmotionTextEncoder,
                                                                 parity: dict) -> None:
    official = encoder.encode([parity["prompt"]])
    cond = build_emotion_schedule(encoder, parity["prompt"], num_frames=7, strength=1.0)
    assert torch.equal(cond.prompt_embedding, official)
    assert torch.equal(cond.uncond, encoder.encode([""]))
    assert all(torch.equal(frame, official[0]) for frame in cond.per_frame)
    spatial, per_frame = cond.for_clip(4, 4)  # reaches past the end: padded frames repeat the last one
    assert torch.equal(spatial, official) and all(torch.equal(f, official[0]) for f in per_frame)
    # a timeline's frames at pure keys are bit-identical too
    timeline = build_emotion_schedule(encoder, f"0: {parity['prompt']} | 0.2: calm", num_frames=10,
                                      fps=10, crossfade=0.3)
    assert all(torch.equal(timeline.per_frame[f], official[0]) for f in range(3))


def test_for_clip_shapes_and_middle_frame() -> None:
    enc = ConstantEncoder({"": 0.0, "a": 0.0, "b": 16.0})
    cond = build_emotion_schedule(enc, "0: a | 0.5: b", num_frames=40, fps=10, crossfade=1.6)
    spatial, per_frame = cond.for_clip(5, 16)  # frames 5..20; the fade runs over frames 5..21
    assert spatial.shape == (1, TEXT_TOKENS, 8) and per_frame.shape == (16, TEXT_TOKENS, 8)
    assert per_frame[:, 0, 0].tolist() == pytest.approx(list(range(16)))
    assert spatial[0, 0, 0].item() == pytest.approx(8.0)  # the clip's middle frame (5 + 16 // 2 = 13)
    tail_spatial, tail = cond.for_clip(32, 16)
    assert tail.shape == (16, TEXT_TOKENS, 8) and torch.all(tail == 16.0)
    with pytest.raises(ValueError, match="past the video"):
        cond.for_clip(40, 16)
    with pytest.raises(ValueError, match="length >= 1"):
        cond.for_clip(0, 0)


def test_bad_schedule_arguments() -> None:
    enc = ConstantEncoder({"": 0.0, "a": 1.0})
    for kwargs, message in [({"num_frames": 0}, "num_frames"), ({"num_frames": 4, "fps": 0}, "fps"),
                            ({"num_frames": 4, "crossfade": -1.0}, "crossfade")]:
        with pytest.raises(ValueError, match=message):
            build_emotion_schedule(enc, "a", **kwargs)


def test_conditioning_moves_to_dtype() -> None:
    enc = ConstantEncoder({"": 0.0, "a": 1.0, "b": 2.0})
    cond = build_emotion_schedule(enc, "0: a | 0.1: b", num_frames=3, fps=10, crossfade=0.0)
    half = cond.to(dtype=torch.float16)
    assert isinstance(half, EmotionSchedule)
    assert half.per_frame.dtype == half.uncond.dtype == half.prompt_embedding.dtype == torch.float16
    assert half.per_frame[:, 0, 0].tolist() == [1.0, 2.0, 2.0] and half.keys == cond.keys
