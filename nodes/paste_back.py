"""Paste-back node: the animated face crop back into the full-size picture."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import comfy_adapter

if TYPE_CHECKING:
    from ..emocast_core.generation_steps import EncodedFace

CATEGORY = "EmoCAST"


class EmoCASTPasteBack:
    DESCRIPTION = ("Scales the generated frames back to the square the Face node cropped and blends them into "
                   "the original picture (one image for all frames, or one frame of a video per generated "
                   "frame), with a soft edge. Gives the talking head in its full-size picture.")
    CATEGORY = CATEGORY
    FUNCTION = "paste"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The full-size frames [N, H, W, 3].",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "original": ("IMAGE", {"tooltip": "The picture given to the Face node (or a video of that size with "
                                              "at least as many frames)."}),
            "frames": ("IMAGE", {"tooltip": "The Sampler's frames."}),
            "face": ("EMOCAST_FACE", {"tooltip": "The Face node's output: where the crop was taken."}),
            "feather": ("INT", {"default": 16, "min": 0, "max": 256, "step": 1,
                                "tooltip": "Width in pixels of the soft edge between the face crop and the "
                                           "picture (0: hard edge)."}),
        }}

    def paste(self, original: Any, frames: Any, face: "EncodedFace", feather: int = 16) -> tuple[Any]:
        from ..emocast_core.paste_back import paste_back
        from . import tensors

        background = tensors.image_to_frames(original, "original")
        height, width = background.shape[-2:]
        if (width, height) != face.image_size:
            raise ValueError(f"original is {width}x{height} but the face was detected in a "
                             f"{face.image_size[0]}x{face.image_size[1]} image; connect the image given to the "
                             "Face node")
        pasted = paste_back(background, tensors.image_to_frames(frames, "frames"), face.prepared.crop_box,
                            feather=int(feather))
        return (tensors.frames_to_image(pasted, comfy_adapter.output_device()),)
