"""The frame rate and the audio sample rate the released model was trained at.

Every frame of a video is 1/25 s of speech, and wav2vec2 hears 16 kHz audio: one frame is 640 samples.
Everything that counts frames or samples reads them from here.
"""
from __future__ import annotations

FPS = 25
SAMPLE_RATE = 16000
