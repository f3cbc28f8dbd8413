"""ComfyUI adapters over `emocast_core` (classic V1 node API).

Importing this package is cheap: it registers the `emocast` model folder and defines the node classes;
torch and the models are imported by the node functions when they run.
"""
from . import comfy_adapter
from .encoders import EmoCASTAudio, EmoCASTEmotion, EmoCASTFace
from .loader import EmoCASTLoader, EmoCASTUnloadModels
from .paste_back import EmoCASTPasteBack
from .sampler import EmoCASTSampler

comfy_adapter.register_model_folder()

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "EmoCASTLoader": EmoCASTLoader,
    "EmoCASTFace": EmoCASTFace,
    "EmoCASTEmotion": EmoCASTEmotion,
    "EmoCASTAudio": EmoCASTAudio,
    "EmoCASTSampler": EmoCASTSampler,
    "EmoCASTPasteBack": EmoCASTPasteBack,
    "EmoCASTUnloadModels": EmoCASTUnloadModels,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "EmoCASTLoader": "EmoCAST Load Models",
    "EmoCASTFace": "EmoCAST Face",
    "EmoCASTEmotion": "EmoCAST Emotion",
    "EmoCASTAudio": "EmoCAST Audio",
    "EmoCASTSampler": "EmoCAST Sampler",
    "EmoCASTPasteBack": "EmoCAST Paste Back",
    "EmoCASTUnloadModels": "EmoCAST Unload Models",
}
