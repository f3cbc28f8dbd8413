"""Video output: generated frames + the original speech -> MP4 (H.264 yuv420p + AAC), written atomically.

Differences from the official release (docs/release_quirks.md §15), on purpose:
- Frame `i` gets the presentation time exactly `i / fps` (integer timestamps in a `1/fps` time base), so
  no frame is ever duplicated or dropped; the release samples a float clock and repeats a few frames.
- The file appears at its destination only once complete (a hidden `.<name>.<pid>.partial` sibling is
  renamed over it); a failure, Ctrl-C or SIGTERM (from the command line) leaves the folder as it was. A
  SIGKILL or power loss can leave the partial file; the next write to the same destination removes it once
  the process named in it no longer runs.
- An output path that is a symbolic link is written through: the video replaces the link's target (the
  partial file is written beside the target, so the rename stays on one file system) and the link stays.

Kept from the release: 8-bit quantisation is `floor(255·x)` after clamping (a truncating cast, not
rounding), and the audio track is the driving audio cut (or silence-padded) to exactly `T / fps` seconds.

Odd frame sizes are padded, not rejected: H.264 in 4:2:0 needs even width and height, and failing at the
very end of a long generation would waste the whole run, so the last row/column is replicated once and
the video comes out one pixel larger in that dimension.
"""
from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np
import torch
from av.video.reformatter import Interpolation

from .partial_files import create_partial, release_partial, remove_stale_partials, write_target
from .preprocess.audio import AudioClip
from .rates import FPS

X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")
# swscale converts RGB with the BT.601 matrix (limited range); tagging the stream says so, so players do
# not guess BT.709 and shift the colours. sRGB content has BT.709 primaries and transfer.
_X264_COLOUR_TAGS = "colorprim=bt709:transfer=bt709:colormatrix=smpte170m:range=tv"

logger = logging.getLogger(__name__)


def _accurate_scaling() -> int | None:
    """swscale flags for exact RGB<->YUV: its fast default truncates, darkening every pixel by ~1 level.

    Needs a PyAV whose `Interpolation` is a flag set (18 is; 12 is not); older ones keep swscale's default.
    """
    if not hasattr(Interpolation, "ACCURATE_RND"):
        return None
    return Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT | Interpolation.FULL_CHR_H_INP


_SCALING = _accurate_scaling()

FrameChunk = torch.Tensor | np.ndarray


def frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) float in [0, 1] -> (T, H, W, 3) uint8 as `floor(255·x)` after clamping.

    The release truncates (`(x * 255).clip(0, 255).astype(uint8)`) rather than rounding, so 0.999 maps
    to 254; keeping it makes our frames byte-identical to official outputs. The product is taken in
    float32 like the release (its decoder output is fp16 moved to fp32 before scaling).
    """
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a torch.Tensor (T, 3, H, W) in [0, 1], got {type(frames).__name__}")
    if frames.dim() != 4 or frames.shape[1] != 3:
        hint = " (ComfyUI IMAGE batches are (B, H, W, 3): use .permute(0, 3, 1, 2))" if frames.shape[-1] == 3 else ""
        raise ValueError(f"frames must have shape (T, 3, H, W), got {tuple(frames.shape)}{hint}")
    if frames.shape[0] == 0:
        raise ValueError("frames is empty (T = 0); there is nothing to write to a video")
    if frames.shape[2] == 0 or frames.shape[3] == 0:
        raise ValueError(f"frames have zero height or width: {tuple(frames.shape)}")
    if not frames.is_floating_point():
        raise ValueError(f"frames must be float in [0, 1], got {frames.dtype}; pass uint8 images as a numpy (T, H, W, 3) array")
    frames = frames.detach().to(device="cpu", dtype=torch.float32)
    _check_finite(frames)
    scaled = (frames * 255.0).clamp_(0.0, 255.0).floor_()
    return np.ascontiguousarray(scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy())


def _check_finite(values: torch.Tensor | np.ndarray) -> None:
    finite = torch.isfinite(values).all() if isinstance(values, torch.Tensor) else np.isfinite(values).all()
    if not finite:
        raise ValueError("frames contain NaN or infinite values; the generation diverged (check dtype/precision)")


def _chunk_to_uint8(chunk: FrameChunk) -> np.ndarray:
    """One streamed item -> (N, H, W, 3) uint8: torch tensors are (N, 3, H, W) or (3, H, W) floats;
    numpy arrays are images, (N, H, W, 3) or (H, W, 3), uint8 or float in [0, 1]."""
    if isinstance(chunk, torch.Tensor):
        return frames_to_uint8(chunk.unsqueeze(0) if chunk.dim() == 3 else chunk)
    if not isinstance(chunk, np.ndarray):
        raise TypeError(
            f"frame chunks must be torch.Tensor (N, 3, H, W) floats or numpy (N, H, W, 3) images, got {type(chunk).__name__}"
        )
    images = chunk[None] if chunk.ndim == 3 else chunk
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"numpy frames must have shape (H, W, 3) or (N, H, W, 3) (RGB), got {chunk.shape}")
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise ValueError(f"numpy frames are empty: shape {chunk.shape}; there is nothing to write")
    if images.dtype == np.uint8:
        return np.ascontiguousarray(images)
    if np.issubdtype(images.dtype, np.floating):
        return frames_to_uint8(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2))
    raise ValueError(f"numpy frames must be uint8 or float in [0, 1], got {images.dtype}")


def _pad_to_even(images: np.ndarray) -> np.ndarray:
    _, height, width, _ = images.shape
    if height % 2 == 0 and width % 2 == 0:
        return images
    return np.pad(images, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def _fps_fraction(fps: float | Fraction) -> Fraction:
    try:
        value = Fraction(fps).limit_denominator(1001)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"fps must be a positive finite number, got {fps!r}") from None
    if value <= 0:
        raise ValueError(f"fps must be a positive finite number, got {fps!r}")
    return value


def _aac_output_format(clip: AudioClip) -> tuple[int, str]:
    """AAC rate and layout for a clip: its own rate when AAC supports it, mono or stereo channels."""
    supported = av.codec.Codec("aac", "w").audio_rates or ()
    rate = clip.sample_rate
    if supported and rate not in supported:
        higher = [r for r in supported if r >= rate]
        rate = min(higher) if higher else max(supported)
    return rate, "mono" if clip.num_channels == 1 else "stereo"


def _layout_name(channels: int) -> str:
    # "Nc" is FFmpeg's default layout for N channels (3c = 2.1, 6c = 5.1), so downmixing weighs them sensibly.
    return {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")


def _prepare_audio(clip: AudioClip, rate: int, layout: str) -> np.ndarray:
    """Whole clip -> planar float32 (channels, samples) at the encoder's rate/layout via PyAV's resampler."""
    if not torch.isfinite(clip.waveform).all():
        raise ValueError("audio contains NaN or infinite samples; re-export the recording")
    out_channels = 1 if layout == "mono" else 2
    if clip.num_samples == 0:
        return np.zeros((out_channels, 0), dtype=np.float32)
    source = np.ascontiguousarray(clip.waveform.detach().cpu().numpy(), dtype=np.float32)
    frame = av.AudioFrame.from_ndarray(source, format="fltp", layout=_layout_name(clip.num_channels))
    frame.sample_rate = clip.sample_rate
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
    parts = [out.to_ndarray() for out in resampler.resample(frame) + resampler.resample(None)]
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


class VideoWriter:
    """Streaming MP4 writer that commits on a clean exit of its `with` block.

        with VideoWriter("out/clip.mp4", fps=25, audio=clip) as writer:
            for chunk in decoded_clips:          # (N, 3, H, W) float tensors or (N, H, W, 3) uint8 arrays
                writer.write(chunk)

    Frames are encoded as they arrive, and the audio track is encoded alongside them (so the two are
    interleaved in the file); at exit the audio is cut or silence-padded to `num_frames / fps` seconds.
    Everything goes to a hidden `.<name>.<pid>.partial` next to `path`, which is renamed over `path` only if
    the block ends without an exception. On any exception — KeyboardInterrupt (and the command line's
    SIGTERM) included — the partial file is deleted and an existing file at `path` stays untouched.

    Entering the block first removes partial files of `path` left by processes that no longer run (a SIGKILL
    gives no chance to clean up), and logs that an existing file at `path` will be replaced. A symbolic link
    at `path` is written through: its target is replaced, the link stays.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float = FPS,
        audio: AudioClip | None = None,
        crf: float = 18,
        preset: str = "medium",
    ) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() != ".mp4":
            raise ValueError(f"video path must end in .mp4 (H.264 + AAC in an MP4 container), got {self.path}")
        if self.path.is_dir():
            raise IsADirectoryError(f"video path {self.path} is a directory; give a file name such as {self.path / 'out.mp4'}")
        self.fps = _fps_fraction(fps)
        if isinstance(crf, bool) or not isinstance(crf, (int, float)) or not 0 <= crf <= 51:
            raise ValueError(f"crf must be a number in [0, 51] (lower is better quality; 18 is visually lossless), got {crf!r}")
        if preset not in X264_PRESETS:
            raise ValueError(f"preset must be one of {', '.join(X264_PRESETS)}; got {preset!r}")
        self.crf = crf
        self.preset = preset
        if audio is not None and not isinstance(audio, AudioClip):
            raise TypeError(f"audio must be an AudioClip (see emocast_core.preprocess.audio.load_audio), got {type(audio).__name__}")
        self._audio_rate, self._audio_layout = _aac_output_format(audio) if audio is not None else (0, "")
        self._audio = _prepare_audio(audio, self._audio_rate, self._audio_layout) if audio is not None else None
        self._audio_sent = 0
        self._frame_size: tuple[int, int] | None = None  # (height, width) as given, before even-padding
        self._num_frames = 0
        self._partial: Path | None = None
        self._target: Path | None = None  # the file replaced at commit: `path`, or the target of a link there
        self._container: av.container.OutputContainer | None = None
        self._video_stream: av.video.stream.VideoStream | None = None
        self._audio_stream: av.audio.stream.AudioStream | None = None
        self._finished = False

    @property
    def num_frames(self) -> int:
        return self._num_frames

    def __enter__(self) -> VideoWriter:
        if self._partial is not None or self._finished:
            raise RuntimeError("a VideoWriter can be used for one `with` block only; create a new one")
        self._partial = self._create_partial_file()
        try:
            with self._disk_errors():
                self._container = av.open(str(self._partial), mode="w", format="mp4",
                                          options={"movflags": "+faststart"})
        except BaseException:
            self._abort()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            with self._disk_errors():
                self._commit()
        except BaseException:
            self._abort()
            raise

    @contextmanager
    def _disk_errors(self) -> Iterator[None]:
        """An OS error while writing (a full or read-only disk) names the output the user asked for, not the
        hidden partial file, and says what to do."""
        try:
            yield
        except OSError as err:
            reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                      errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}.get(
                err.errno, err.strerror or str(err))
            named = OSError(f"cannot write the video {self.path}: {reason}; free some space or choose another "
                            "output path")
            named.errno = err.errno  # str() stays the sentence, errno stays for callers that test it
            raise named from err

    def write(self, frames: FrameChunk) -> None:
        """Encode one frame or a chunk of frames (see the class docstring for the accepted layouts)."""
        if self._container is None:
            raise RuntimeError("VideoWriter.write() must be called inside its `with` block")
        images = _chunk_to_uint8(frames)
        size = (images.shape[1], images.shape[2])
        if self._frame_size is None:
            self._frame_size = size
            self._add_streams(_pad_to_even(images[:1]).shape[1:3])
        elif size != self._frame_size:
            raise ValueError(
                f"all frames must have the same size: got {size[1]}x{size[0]} after {self._frame_size[1]}x{self._frame_size[0]}"
            )
        with self._disk_errors():
            for image in _pad_to_even(images):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p",
                                                                                   interpolation=_SCALING)
                # Integer timestamps in a 1/fps time base: frame i is presented at exactly i / fps.
                frame.pts = self._num_frames
                frame.time_base = 1 / self.fps
                self._mux(self._video_stream.encode(frame))
                self._num_frames += 1
            self._send_audio_until(self._audio_samples_for(self._num_frames))

    def _create_partial_file(self) -> Path:
        target = self._target = write_target(self.path)
        folder = target.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"cannot create the output folder {folder} for {target.name}: {err}") from err
        remove_stale_partials(target, "video")
        try:
            partial = create_partial(target)
        except PermissionError as err:
            raise PermissionError(f"cannot write video {self.path}: the folder {folder} is not writable ({err})") from err
        if target.exists():
            # info, not a warning: replacing --out is what was asked for; the line says so before the work.
            logger.info("%s exists; it will be replaced when the new video is complete", self.path)
        return partial

    def _add_streams(self, even_size: tuple[int, int]) -> None:
        options = {"crf": str(self.crf), "preset": self.preset, "x264-params": _X264_COLOUR_TAGS}
        stream = self._container.add_stream("libx264", rate=self.fps, options=options)
        stream.height, stream.width = even_size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / self.fps
        self._video_stream = stream
        if self._audio is not None:
            self._audio_stream = self._container.add_stream("aac", rate=self._audio_rate, layout=self._audio_layout)

    def _audio_samples_for(self, num_frames: int) -> int:
        return round(num_frames * self._audio_rate / self.fps)

    def _send_audio_until(self, end: int) -> None:
        """Encode audio samples [sent, end), silence past the end of the clip."""
        if self._audio_stream is None or end <= self._audio_sent:
            return
        chunk = self._audio[:, self._audio_sent : end]
        missing = end - self._audio_sent - chunk.shape[1]
        if missing > 0:
            chunk = np.pad(chunk, ((0, 0), (0, missing)))
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=self._audio_layout)
        frame.sample_rate = self._audio_rate
        # A timestamp lets the muxer record the AAC encoder delay, so decoders drop the priming samples.
        frame.pts, frame.time_base = self._audio_sent, Fraction(1, self._audio_rate)
        self._mux(self._audio_stream.encode(frame))
        self._audio_sent = end

    def _mux(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            self._container.mux(packet)

    def _commit(self) -> None:
        if self._num_frames == 0:
            raise ValueError(f"no frames were written to {self.path}; the frame source was empty")
        self._mux(self._video_stream.encode(None))
        if self._audio_stream is not None:
            self._mux(self._audio_stream.encode(None))
        self._container.close()
        self._container = None
        with self._partial.open("rb+") as handle:
            # Without it a crash right after the rename can leave a truncated file under the final name.
            os.fsync(handle.fileno())
        partial, self._partial = self._partial, None
        try:
            os.replace(partial, self._target)
        except BaseException:
            self._partial = partial  # still ours: _abort deletes it
            raise
        release_partial(partial, delete=False)  # renamed: its name may already be another writer's
        self._finished = True

    def _abort(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            try:
                container.close()
            except Exception:  # noqa: BLE001 - the file is being discarded; the original error matters
                pass
        if self._partial is not None:
            release_partial(self._partial, delete=True)
            self._partial = None
        self._finished = True


def write_video(
    path: str | os.PathLike,
    frames: torch.Tensor | np.ndarray | Iterable[FrameChunk],
    fps: float = FPS,
    audio: AudioClip | None = None,
    crf: float = 18,
    preset: str = "medium",
) -> Path:
    """Write frames (+ optional speech) to an MP4 atomically; returns the final path.

    `frames` is a (T, 3, H, W) float tensor in [0, 1], a (T, H, W, 3) uint8 array, or an iterable of
    such chunks / single frames (streamed, so long videos need not be held in memory). `audio` is cut
    or silence-padded to T / fps seconds. See `VideoWriter` for the atomicity guarantees.
    """
    if isinstance(frames, (str, bytes, os.PathLike)) or not isinstance(frames, (torch.Tensor, np.ndarray, Iterable)):
        raise TypeError(
            f"frames must be a (T, 3, H, W) tensor, a (T, H, W, 3) uint8 array or an iterable of them, got {type(frames).__name__}"
        )
    writer = VideoWriter(path, fps=fps, audio=audio, crf=crf, preset=preset)
    with writer:
        if isinstance(frames, (torch.Tensor, np.ndarray)):
            if frames.ndim != 4:
                raise ValueError(f"frames must be 4-D, (T, 3, H, W) tensor or (T, H, W, 3) array; got shape {tuple(frames.shape)}")
            writer.write(frames)
        else:
            for chunk in frames:
                writer.write(chunk)
    return writer.path


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float, AudioClip | None]:
    """Decode an MP4 (or any video) into (T, H, W, 3) uint8 RGB frames, the frame rate and its audio track."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as err:
        raise ValueError(f"could not open {path} as a video: {err}") from err
    with container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        images: list[np.ndarray] = []
        resampler = av.AudioResampler(format="fltp")
        samples: list[np.ndarray] = []
        # One demux pass over both streams: the file is read once, whatever its interleaving.
        for packet in container.demux([s for s in (video, audio) if s is not None]):
            for frame in packet.decode():
                if packet.stream is video:
                    images.append(frame.to_ndarray(format="rgb24", interpolation=_SCALING))
                else:
                    samples.extend(out.to_ndarray() for out in resampler.resample(frame))
        if audio is not None:
            samples.extend(out.to_ndarray() for out in resampler.resample(None))
        rate = video.average_rate or video.guessed_rate or video.base_rate
        fps = float(rate) if rate else float("nan")
        clip = _audio_clip(audio, samples) if audio is not None else None
    if not images:
        raise ValueError(f"{path} contains no decodable video frames")
    return np.stack(images), fps, clip


def _audio_clip(stream: av.audio.stream.AudioStream, samples: list[np.ndarray]) -> AudioClip:
    rate = stream.codec_context.sample_rate
    waveform = np.concatenate(samples, axis=1) if samples else np.zeros((stream.codec_context.channels, 0), np.float32)
    if stream.duration is not None and stream.time_base is not None:
        # Decoders keep the padding of the last AAC frame; the container records the true length.
        waveform = waveform[:, : round(stream.duration * stream.time_base * rate)]
    return AudioClip(torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)), rate)
