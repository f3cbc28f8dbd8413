"""Face, emotion and audio nodes: each encodes one input for the sampler (cached by ComfyUI on its own)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..emocast_core.rates import FPS, SAMPLE_RATE
from . import comfy_adapter, widgets

if TYPE_CHECKING:
    from ..emocast_core.generation_steps import EncodedAudio, EncodedEmotion
    from .model_cache import ModelHandle

CATEGORY = "EmoCAST"
MODEL_TOOLTIP = "The models from the 'EmoCAST Load Models' node."


class EmoCASTFace:
    DESCRIPTION = ("Detects the largest face in the portrait (insightface), takes a square crop around it and "
                   "builds the face conditioning: reference image, identity embedding, face box and the face / "
                   "lip attention masks. The previews show what the model will see.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("EMOCAST_FACE", "IMAGE", "MASK", "MASK", "MASK")
    RETURN_NAMES = ("face", "crop", "face_mask", "lip_mask", "attention_masks")
    OUTPUT_TOOLTIPS = (
        "Face conditioning for the Sampler (and the crop box for the Paste Back node).",
        "The reference image the video starts from (size x size).",
        "The face box given to the FaceLocator (1 inside).",
        "The lip box (1 inside).",
        "The attention masks of the emotive audio attention, upsampled: pose (background), face without lips, lips.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        from ..emocast_core.sampling_settings import IMAGE_SIZE_MULTIPLE, MAX_SIZE

        return {"required": {
            "model": ("EMOCAST_MODEL", {"tooltip": MODEL_TOOLTIP}),
            "image": ("IMAGE", {"tooltip": "One portrait with a clearly visible face (any size; 512 px or more "
                                           "around the face is best)."}),
            "size": ("INT", {"default": 512, "min": IMAGE_SIZE_MULTIPLE, "max": MAX_SIZE, "step": IMAGE_SIZE_MULTIPLE,
                             "tooltip": f"Side of the generated square video in pixels (a multiple of "
                                        f"{IMAGE_SIZE_MULTIPLE}; the model was trained at 512)."}),
            "crop": ("BOOLEAN", {"default": True, "label_on": "crop around the face", "label_off": "whole image",
                                 "tooltip": "Crop a square around the face (any photo works). Off: the whole "
                                            "image is squashed to a square, as the original code does (for "
                                            "square, face-centred portraits)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, size: int | None = None) -> bool | str:
        from ..emocast_core.sampling_settings import check_size

        return widgets.validate(cls, {"size": size}, lambda: size is None or check_size(int(size)))

    def encode(self, model: "ModelHandle", image: Any, size: int = 512, crop: bool = True) -> tuple[Any, ...]:
        import torch

        from ..emocast_core.generation_steps import encode_face
        from ..emocast_core.preprocess.face import validate_portrait
        from . import tensors

        portrait = tensors.image_to_portrait(image, "the portrait")
        validate_portrait(portrait)  # before the models are loaded onto the device
        with model.use() as models:
            face = encode_face(models, portrait, size=int(size), crop=bool(crop))
        f = face.prepared
        out = comfy_adapter.output_device()
        crop_image = tensors.frames_to_image((f.reference[None] + 1) / 2, out).clamp(0, 1)
        attention = [tensors.level_mask(levels[0], face.size) for levels in (f.masks.pose, f.masks.face, f.masks.lip)]
        return (face, crop_image, f.face_region[:1].to(out), tensors.rect_mask(f.lip_rect, face.size).to(out),
                torch.cat(attention).to(out))


class EmoCASTEmotion:
    DESCRIPTION = ("Encodes the emotion text with CLIP. Either one prompt ('a person talking happily') or a "
                   "timeline of '<seconds>: <prompt>' parts separated by '|' or new lines ('0: calm | 4.0: "
                   "furious'); each change blends over 'crossfade' seconds.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("EMOCAST_EMOTION",)
    RETURN_NAMES = ("emotion",)
    OUTPUT_TOOLTIPS = ("The encoded emotion for the Sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("EMOCAST_MODEL", {"tooltip": MODEL_TOOLTIP}),
            "text": ("STRING", {"default": "a person talking", "multiline": True, "dynamicPrompts": False,
                                "placeholder": "a person talking happily\n(or a timeline)\n0: calm | 4.0: furious",
                                "tooltip": "An emotion prompt, or a timeline '<seconds>: <prompt>' separated by "
                                           "'|' or new lines, times increasing from 0. At most 77 CLIP tokens "
                                           "per prompt."}),
            "crossfade": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 10.0, "step": 0.05,
                                    "tooltip": "Seconds over which each timeline change blends into the next "
                                               "emotion (0: hard cut)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3.0, "step": 0.05,
                                   "tooltip": "Experimental: scales the emotion away from a neutral text (0: "
                                              "neutral, 1: as trained, above 1: exaggerated)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, text: str | None = None, crossfade: float | None = None,
                        strength: float | None = None) -> bool | str:
        from ..emocast_core.emotion import check_blend_options, parse_emotion_timeline

        def check() -> None:
            if text is not None:
                parse_emotion_timeline(text)
            check_blend_options(0.0 if crossfade is None else crossfade, 1.0 if strength is None else strength)

        return widgets.validate(cls, {"crossfade": crossfade, "strength": strength}, check)

    def encode(self, model: "ModelHandle", text: str, crossfade: float = 0.5,
               strength: float = 1.0) -> tuple["EncodedEmotion"]:
        from ..emocast_core.generation_steps import encode_emotion

        with model.use("text_encoder") as models:
            return (encode_emotion(models, text, crossfade=float(crossfade), strength=float(strength)),)


class EmoCASTAudio:
    DESCRIPTION = (f"Turns the speech into wav2vec2 features at the video frame rate ({FPS} fps); the video "
                   "lasts as long as the audio. The vocals are separated first when the model folder has a "
                   f"separator; mixed to mono and resampled to {SAMPLE_RATE / 1000:g} kHz internally. The "
                   "Sampler outputs the original audio cut to the video.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("EMOCAST_AUDIO",)
    RETURN_NAMES = ("audio_features",)
    OUTPUT_TOOLTIPS = ("The speech features (and the speech itself) for the Sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        from ..emocast_core.sampling_settings import SamplingSettings

        return {"required": {
            "model": ("EMOCAST_MODEL", {"tooltip": MODEL_TOOLTIP}),
            "audio": ("AUDIO", {"tooltip": "The speech (e.g. from Load Audio): any length, rate and channels."}),
            "clip_length": ("INT", {"default": SamplingSettings.clip_length, "min": 4, "max": 30, "step": 1,
                                    "tooltip": "Frames generated together; the model was trained with "
                                               f"{SamplingSettings.clip_length}. The features are padded to whole "
                                               "clips, so the Sampler uses this value."}),
            "separate_vocals": ("BOOLEAN", {"default": True, "label_on": "separate vocals",
                                            "label_off": "audio as given",
                                            "tooltip": "Remove music and noise with the vocal separator in the "
                                                       "model folder's separator/ (Kim_Vocal_2.onnx) first, as "
                                                       "released. Without that model the audio is used as given."}),
        }}

    def encode(self, model: "ModelHandle", audio: Any, clip_length: int,
               separate_vocals: bool = True) -> tuple["EncodedAudio"]:
        from ..emocast_core.generation_steps import encode_audio
        from . import tensors

        clip = tensors.audio_to_clip(audio, "the speech")
        with model.use("audio_encoder") as models:
            return (encode_audio(models, clip, clip_length=int(clip_length), separate_vocals=bool(separate_vocals)),)
