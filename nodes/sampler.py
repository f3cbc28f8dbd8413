"""The sampler node: face + audio + emotion -> video frames, the speech cut to them, and the frame rate."""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..emocast_core.rates import FPS
from . import comfy_adapter, widgets

if TYPE_CHECKING:
    from ..emocast_core.generation_steps import EncodedAudio, EncodedEmotion, EncodedFace
    from ..emocast_core.sampling_settings import SamplingSettings
    from .model_cache import ModelHandle

CATEGORY = "EmoCAST"


class EmoCASTSampler:
    DESCRIPTION = ("Generates the talking-head video: DDIM with classifier-free guidance over clips of frames, "
                   "each clip continuing from the last frames of the previous one. Outputs the frames, the speech "
                   f"trimmed to exactly frames / fps seconds and the fps ({FPS}), ready for Create Video or "
                   "Video Combine. Cancel stops it between denoising steps.")
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE", "AUDIO", "FLOAT")
    RETURN_NAMES = ("frames", "audio", "fps")
    OUTPUT_TOOLTIPS = (
        "The video frames [N, H, W, 3] in 0..1.",
        "The input speech cut (or padded with silence) to exactly N / fps seconds.",
        f"Frames per second ({FPS}).",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        from ..emocast_core.sampling_settings import MAX_SEED
        from ..emocast_core.sampling_settings import SamplingSettings as S

        weight = {"min": 0.0, "max": 3.0, "step": 0.05}
        pose, face, lip = S.weights
        return {"required": {
            "model": ("EMOCAST_MODEL", {"tooltip": "The models from the 'EmoCAST Load Models' node."}),
            "face": ("EMOCAST_FACE", {"tooltip": "From the 'EmoCAST Face' node."}),
            "audio_features": ("EMOCAST_AUDIO", {"tooltip": "From the 'EmoCAST Audio' node; sets the video length "
                                                            "and the clip length."}),
            "emotion": ("EMOCAST_EMOTION", {"tooltip": "From the 'EmoCAST Emotion' node."}),
            "steps": ("INT", {"default": S.steps, "min": 1, "max": 200,
                              "tooltip": f"Denoising steps per clip ({S.steps} as released; fewer is faster and "
                                         "rougher)."}),
            "cfg": ("FLOAT", {"default": S.cfg, "min": 1.05, "max": 20.0, "step": 0.05,
                              "tooltip": f"Classifier-free guidance scale ({S.cfg} as released; must be above 1)."}),
            "seed": ("INT", {"default": S.seed, "min": 0, "max": MAX_SEED,
                             "tooltip": "Seed of the noise; the same seed and inputs give the same video."}),
            "pose_weight": ("FLOAT", dict(weight, default=pose,
                                          tooltip="Weight of the audio on head pose (background mask).")),
            "face_weight": ("FLOAT", dict(weight, default=face,
                                          tooltip="Weight of the audio on the facial expression.")),
            "lip_weight": ("FLOAT", dict(weight, default=lip, tooltip="Weight of the audio on the lip movement.")),
            "decode_batch": ("INT", {"default": S.decode_batch, "min": 1, "max": 32,
                                     "tooltip": "Frames the VAE decodes at once; 1 uses the least memory."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, steps: int | None = None, cfg: float | None = None, seed: int | None = None,
                        pose_weight: float | None = None, face_weight: float | None = None,
                        lip_weight: float | None = None, decode_batch: int | None = None) -> bool | str:
        values = {"steps": steps, "cfg": cfg, "seed": seed, "pose_weight": pose_weight, "face_weight": face_weight,
                  "lip_weight": lip_weight, "decode_batch": decode_batch}
        return widgets.validate(cls, values, lambda: _settings(values).validate())

    def sample(self, model: "ModelHandle", face: "EncodedFace", audio_features: "EncodedAudio",
               emotion: "EncodedEmotion", steps: int | None = None, cfg: float | None = None, seed: int | None = None,
               pose_weight: float | None = None, face_weight: float | None = None, lip_weight: float | None = None,
               decode_batch: int | None = None) -> tuple[Any, ...]:
        """ComfyUI passes every widget; a widget left out (a script calling the node) takes the library's default."""
        from ..emocast_core.generation_steps import sample
        from ..emocast_core.sampling import GenerationCancelled, Progress
        from . import tensors

        settings = _settings({"steps": steps, "cfg": cfg, "seed": seed, "pose_weight": pose_weight,
                              "face_weight": face_weight, "lip_weight": lip_weight, "decode_batch": decode_batch},
                             clip_length=audio_features.clip_length)
        settings.validate()  # before any model is moved to the device
        total = audio_features.features.num_clips * settings.steps
        update = comfy_adapter.make_progress(total)

        def progress(p: Progress) -> None:
            update(p.done)

        try:
            with model.use("net", "vae") as models:
                result = sample(models, face, audio_features, emotion, settings, progress=progress,
                                cancel=comfy_adapter.interrupted)
        except GenerationCancelled as err:
            comfy_adapter.raise_cancelled(err)
        out = comfy_adapter.output_device()
        return (tensors.frames_to_image(result.frames, out), tensors.clip_to_audio(result.audio), float(result.fps))


def _settings(widget_values: dict[str, Any], **fixed: Any) -> "SamplingSettings":
    """The sampler settings from the node's widgets; a widget left out (None: a script calling the node, or a
    linked input at queue time) keeps the library's default."""
    from ..emocast_core.sampling_settings import SamplingSettings

    default = SamplingSettings(**fixed)
    given = {k: v for k, v in widget_values.items() if v is not None}
    weights = tuple(float(given.pop(f"{branch}_weight", d))
                    for branch, d in zip(("pose", "face", "lip"), default.weights))
    return replace(default, weights=weights, **{k: type(getattr(default, k))(v) for k, v in given.items()})
