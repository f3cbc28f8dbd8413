"""Tiny synthetic MDX-Net models with the real ONNX signature (offline tests and ``selftest``).

Each takes ``input`` float32 (batch, 4, dim_f, dim_t) — the spectrogram channels [left real, left imag,
right real, right imag] — and returns ``output`` of the same shape:

* identity: multiplies by a constant gain, so the separator returns its input up to the band limit;
* low-pass: keeps only the frequency bins below a cut-off, so a high tone disappears and a low one stays;
* channel swap: exchanges the left and right (real, imag) pairs, so the stereo channels trade places.

The low-pass and swap models only give the expected audio when the spectrogram layout is right.
Nothing here depends on pytest.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ..preprocess.vocal_separation import MDXParams
from .onnx_graphs import save_graph
_SWAPPED_CHANNELS = (2, 3, 0, 1)


def write_identity_mdx(path: str | Path, params: MDXParams = MDXParams(), gain: float = 1.0,
                       channels: int = 4) -> Path:
    """Model returning `gain` x its input; `channels` other than 4 gives a deliberately wrong signature."""
    scale = np.full((1, channels, params.dim_f, 1), gain, dtype=np.float32)
    return _write(Path(path), params, channels, scale)


def write_lowpass_mdx(path: str | Path, params: MDXParams, cutoff_bin: int) -> Path:
    """Model keeping the STFT bins below `cutoff_bin` (cutoff_bin * sample_rate / n_fft Hz) and zeroing the rest."""
    if not 0 < cutoff_bin <= params.dim_f:
        raise ValueError(f"cutoff_bin must be in [1, dim_f={params.dim_f}], got {cutoff_bin}")
    scale = np.zeros((1, 4, params.dim_f, 1), dtype=np.float32)
    scale[:, :, :cutoff_bin] = 1.0
    return _write(Path(path), params, 4, scale)


def write_channel_swap_mdx(path: str | Path, params: MDXParams) -> Path:
    """Model exchanging the left and right spectrogram pairs: channels (0, 1, 2, 3) -> (2, 3, 0, 1)."""
    return _write(Path(path), params, 4, np.ones((1, 4, params.dim_f, 1), dtype=np.float32),
                  order=_SWAPPED_CHANNELS)


def _write(path: Path, params: MDXParams, channels: int, scale: np.ndarray,
           order: tuple[int, ...] | None = None) -> Path:
    shape = ["batch_size", channels, params.dim_f, params.dim_t]
    nodes, initializers, source = [], [numpy_helper.from_array(scale, name="scale")], "input"
    if order is not None:
        initializers.append(numpy_helper.from_array(np.asarray(order, dtype=np.int64), name="order"))
        nodes.append(helper.make_node("Gather", ["input", "order"], ["reordered"], axis=1))
        source = "reordered"
    nodes.append(helper.make_node("Mul", [source, "scale"], ["output"]))
    graph = helper.make_graph(
        nodes,
        "synthetic_mdx_net",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
        initializer=initializers,
    )
    return save_graph(graph, path)
