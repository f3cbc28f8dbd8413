"""The sampler node: face + audio + emotion -> video frames, the speech cut to them, and the frame rate."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import comfy_adapter

if TYPE_CHECKING:
    from ..emocast_core.generation_steps import AudioInput, EmotionInput, FaceInput
    from .model_cache import ModelHandle

CATEGORY = "EmoCAST"
SEED_MAX = 0xFFFFFFFFFFFFFFFF  # torch.Generator.manual_seed takes any unsigned 64-bit value


class EmoCASTSampler:
    DESCRIPTION = ("Generates the talking-head video: DDIM with classifier-free guidance over clips of frames, "
                   "each clip continuing from the last frames of the previous one. Outputs the frames, the speech "
                   "trimmed to exactly frames / fps seconds and the fps (25), ready for Create Video or "
                   "Video Combine. Cancel stops it between denoising steps.")
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE", "AUDIO", "FLOAT")
    RETURN_NAMES = ("frames", "audio", "fps")
    OUTPUT_TOOLTIPS = (
        "The video frames [N, H, W, 3] in 0..1.",
        "The input speech cut (or padded with silence) to exactly N / fps seconds.",
        "Frames per second (25).",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        weight = {"default": 1.0, "min": 0.0, "max": 3.0, "step": 0.05}
        return {"required": {
            "model": ("EMOCAST_MODEL", {"tooltip": "The models from the 'EmoCAST Load Models' node."}),
            "face": ("EMOCAST_FACE", {"tooltip": "From the 'EmoCAST Face' node."}),
            "audio_features": ("EMOCAST_AUDIO", {"tooltip": "From the 'EmoCAST Audio' node; sets the video length "
                                                            "and the clip length."}),
            "emotion": ("EMOCAST_EMOTION", {"tooltip": "From the 'EmoCAST Emotion' node."}),
            "steps": ("INT", {"default": 40, "min": 1, "max": 200,
                              "tooltip": "Denoising steps per clip (40 as released; fewer is faster and rougher)."}),
            "cfg": ("FLOAT", {"default": 3.5, "min": 1.05, "max": 20.0, "step": 0.05,
                              "tooltip": "Classifier-free guidance scale (3.5 as released; must be above 1)."}),
            "seed": ("INT", {"default": 42, "min": 0, "max": SEED_MAX,
                             "tooltip": "Seed of the noise; the same seed and inputs give the same video."}),
            "pose_weight": ("FLOAT", dict(weight, tooltip="Weight of the audio on head pose (background mask).")),
            "face_weight": ("FLOAT", dict(weight, tooltip="Weight of the audio on the facial expression.")),
            "lip_weight": ("FLOAT", dict(weight, tooltip="Weight of the audio on the lip movement.")),
            "decode_batch": ("INT", {"default": 4, "min": 1, "max": 32,
                                     "tooltip": "Frames the VAE decodes at once; 1 uses the least memory."}),
        }}

    def sample(self, model: "ModelHandle", face: "FaceInput", audio_features: "AudioInput",
               emotion: "EmotionInput", steps: int = 40, cfg: float = 3.5, seed: int = 42, pose_weight: float = 1.0,
               face_weight: float = 1.0, lip_weight: float = 1.0, decode_batch: int = 4) -> tuple[Any, ...]:
        from ..emocast_core.generation_steps import sample
        from ..emocast_core.sampling import GenerationCancelled, Progress, SamplingSettings
        from . import tensors

        settings = SamplingSettings(steps=int(steps), cfg=float(cfg), seed=int(seed),
                                    clip_length=audio_features.clip_length,
                                    weights=(float(pose_weight), float(face_weight), float(lip_weight)),
                                    decode_batch=int(decode_batch))
        settings.validate()  # before any model is moved to the device
        total = audio_features.features.num_clips * settings.steps
        update = comfy_adapter.make_progress(total)

        def progress(p: Progress) -> None:
            update(p.clip * p.steps + p.step)

        try:
            with model.use("net", "vae") as models:
                result = sample(models, face, audio_features, emotion, settings, progress=progress,
                                cancel=comfy_adapter.interrupted)
        except GenerationCancelled as err:
            comfy_adapter.raise_cancelled(err)
        out = comfy_adapter.output_device()
        return (tensors.frames_to_image(result.frames, out), tensors.clip_to_audio(result.audio), float(result.fps))
