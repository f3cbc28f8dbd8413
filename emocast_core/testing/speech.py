"""Synthetic speech for tests and self-checks: eSpeak NG driven through ctypes (no network, no model files).

The `espeakng-loader` wheel ships libespeak-ng and its voice data, so this works without a system install.
"""
from __future__ import annotations

import ctypes
import threading
from typing import Any

import numpy as np
import torch
import torchaudio.functional as AF

from ..rates import SAMPLE_RATE

# eSpeak NG C API constants (speak_lib.h).
_AUDIO_OUTPUT_SYNCHRONOUS = 0x02
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1

_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

# libespeak-ng keeps one synthesiser per process; serialise callers so their audio does not interleave.
_ENGINE_LOCK = threading.Lock()


def synthesize_speech(text: str, sample_rate: int = SAMPLE_RATE, voice: str = "en-us") -> np.ndarray:
    """Speak `text` with eSpeak NG: float32 mono waveform in [-1, 1] at `sample_rate` Hz."""
    if not text.strip():
        raise ValueError("synthesize_speech needs non-empty text")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    lib, data_path = _load_espeak()
    with _ENGINE_LOCK:
        pcm, native_rate = _synthesize(lib, data_path, text, voice)
    if pcm.size == 0:
        raise RuntimeError(f"eSpeak NG produced no audio for {text!r}")
    waveform = torch.from_numpy(pcm.astype(np.float32) / 32768.0)
    if native_rate != sample_rate:
        waveform = AF.resample(waveform, native_rate, sample_rate)
    return waveform.numpy()


def _load_espeak() -> tuple[Any, str]:
    try:
        import espeakng_loader
    except ImportError as err:
        raise ImportError(
            "synthetic speech needs eSpeak NG: pip install espeakng-loader (it bundles the library and voices)"
        ) from err
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
        ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
    ]
    lib.espeak_Synth.restype = ctypes.c_int
    return lib, espeakng_loader.get_data_path()


def _synthesize(lib: Any, data_path: str, text: str, voice: str) -> tuple[np.ndarray, int]:
    native_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _INITIALIZE_DONT_EXIT)
    if native_rate <= 0:
        raise RuntimeError(f"eSpeak NG failed to initialise with data at {data_path}")
    chunks: list[np.ndarray] = []

    def collect(wav: Any, num_samples: int, _events: Any) -> int:
        if wav and num_samples > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = keep synthesising

    callback = _SynthCallback(collect)  # must stay referenced while the library may call it
    lib.espeak_SetSynthCallback(callback)
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise ValueError(f"eSpeak NG has no voice {voice!r}; try 'en-us' or 'en'")
    encoded = text.encode("utf-8")
    status = lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    if status != 0:
        raise RuntimeError(f"eSpeak NG synthesis failed with status {status}")
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
    return pcm, native_rate
