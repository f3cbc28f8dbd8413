"""Model loader and unload nodes, and the listing of model files for the loader's dropdown."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..emocast_core.model_paths import NET_FILES
from . import comfy_adapter
from .model_cache import MODEL_CACHE, LoadSpec, ModelHandle

CATEGORY = "EmoCAST"
NET_SUFFIXES = (".safetensors", ".pth", ".pt")
NO_MODELS = "no EmoCAST models found (see the node's description)"
FROM_FOLDER = "(from the EmoCAST folder)"
PRECISIONS = ["auto", "fp32", "fp16", "bf16", "fp16-force"]  # the library's (emocast_core.runtime.PRECISIONS)
DEVICES = ["auto", "cpu", "cuda"]

LAYOUT = ("models/emocast/ (or a sub-folder of it, one per model variant) holding emocast.safetensors or net.pth, "
          "config.json (optional), vae/, clip/, wav2vec2/ and face_analysis/ (see the README's model table)")


def _is_network_file(path: Path) -> bool:
    """A known network file name, or any weights file that has the rest of a model folder (vae/) beside it."""
    if not path.is_file():
        return False
    return path.name in NET_FILES or (path.suffix in NET_SUFFIXES and (path.parent / "vae").is_dir())


def list_network_files(roots: list[Path]) -> list[str]:
    """Network files directly in a root or in a direct sub-folder, as '/'-separated paths relative to it."""
    found: list[str] = []
    for root in roots:
        if not root.is_dir():
            continue
        folders = [root] + sorted(p for p in root.iterdir() if p.is_dir())
        for folder in folders:
            for path in sorted(folder.iterdir()):
                name = path.relative_to(root).as_posix()
                if name not in found and _is_network_file(path):
                    found.append(name)
    return found


def model_choices() -> list[str]:
    return list_network_files(comfy_adapter.model_roots()) or [NO_MODELS]


def resolve_choice(choice: str) -> Path:
    """The network file a dropdown entry names (first root that has it), or a helpful error."""
    roots = comfy_adapter.model_roots()
    where = ", ".join(str(r) for r in roots) or \
        f"nowhere (ComfyUI is not running and ${comfy_adapter.MODELS_DIR_ENV} is unset)"
    if Path(choice).is_absolute() or ".." in Path(choice).parts:
        raise ValueError(f"model {choice!r} must be a file name from the list, relative to a model folder")
    if choice != NO_MODELS:
        for root in roots:
            if _is_network_file(root / choice):
                return root / choice
        raise FileNotFoundError(f"EmoCAST model {choice!r} is not in any model folder (searched {where}); refresh "
                                "the page (R) to update the list")
    raise FileNotFoundError(f"no EmoCAST model found: searched {where}. Put the model files in {LAYOUT}, then "
                            "refresh the page (R)")


def shared_file_choices(folder_key: str) -> list[str]:
    """A dropdown of the files in one of ComfyUI's own model folders, after the EmoCAST folder's default."""
    return [FROM_FOLDER] + comfy_adapter.comfy_model_files(folder_key)


def shared_file(folder_key: str, choice: str) -> Path | None:
    """The file a shared-folder dropdown names; None for the EmoCAST folder's own sub-folder."""
    if choice == FROM_FOLDER:
        return None
    return comfy_adapter.comfy_model_file(folder_key, choice).resolve()


def shared_choice_input(folder_key: str, what: str) -> tuple[list[str], dict[str, str]]:
    return (shared_file_choices(folder_key), {
        "default": FROM_FOLDER, "tooltip": f"Optional: reuse {what} from ComfyUI's models/{folder_key} folder "
                                           f"instead of the EmoCAST folder's own copy."})


class EmoCASTLoader:
    DESCRIPTION = (
        "Loads the EmoCAST networks, VAE, CLIP text encoder, wav2vec2 and insightface face models from one "
        f"model folder: {LAYOUT}. More locations: add an 'emocast' entry to extra_model_paths.yaml or set "
        f"${comfy_adapter.MODELS_DIR_ENV}. The VAE, CLIP-L text encoder and wav2vec2 can instead come from "
        "ComfyUI's own models/vae, models/text_encoders and models/audio_encoders folders (the optional inputs), "
        "and then that sub-folder is not needed. Loaded models are kept between runs (one model at a time) until the "
        "'EmoCAST Unload Models' node frees them; ComfyUI's memory management moves them off the GPU when it needs "
        "room (or on 'Unload Models') and the next run brings them back.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("EMOCAST_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded EmoCAST models; connect to the Face, Emotion, Audio and Sampler nodes.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": (model_choices(), {"tooltip": "The network file (emocast.safetensors or net.pth); the vae/, "
                                                   "clip/, wav2vec2/ and face_analysis/ folders beside it are "
                                                   "loaded with it."}),
            "precision": (PRECISIONS, {"default": "auto", "tooltip": "auto: fp16 on a GPU (as released), fp32 on "
                                                                     "the CPU. bf16 needs a recent GPU. fp16 on the "
                                                                     "CPU falls back to fp32 (fp16 is very slow "
                                                                     "there); fp16-force runs it anyway."}),
            "device": (DEVICES, {"default": "auto", "tooltip": "auto: ComfyUI's compute device (--cpu is "
                                                               "honoured)."}),
            "offload": ("BOOLEAN", {"default": False, "label_on": "offload to CPU", "label_off": "keep on device",
                                    "tooltip": "Low memory: keep the weights in CPU RAM and move each part to the "
                                               "device only while it runs (slower)."}),
        }, "optional": {
            "vae": shared_choice_input("vae", "the SD1.5 VAE (e.g. vae-ft-mse-840000-ema-pruned.safetensors)"),
            "clip": shared_choice_input("text_encoders", "the CLIP-L text encoder (clip_l.safetensors; the "
                                                         "tokenizer is ComfyUI's own)"),
            "audio_encoder": shared_choice_input("audio_encoders", "wav2vec2-base (960h, the English model "
                                                                   "EmoCAST was trained with)"),
        }}

    def load(self, model: str, precision: str = "auto", device: str = "auto", offload: bool = False,
             vae: str = FROM_FOLDER, clip: str = FROM_FOLDER,
             audio_encoder: str = FROM_FOLDER) -> tuple[ModelHandle]:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        # Not resolve(): the vae/, clip/, wav2vec2/ and face_analysis/ folders sit beside the file as listed,
        # which may be a symlink to weights elsewhere (another drive) with nothing beside its target.
        net = resolve_choice(model).absolute()
        clip_file = shared_file("text_encoders", clip)
        spec = LoadSpec(net, precision, device, bool(offload), vae_file=shared_file("vae", vae), clip_file=clip_file,
                        # the tokenizer ComfyUI ships; without it (None) the model folder's clip/
                        tokenizer_dir=comfy_adapter.comfy_clip_tokenizer() if clip_file else None,
                        wav2vec2_file=shared_file("audio_encoders", audio_encoder))
        handle = ModelHandle(spec, MODEL_CACHE)
        handle.models()  # load now, so that file errors show on this node
        return (handle,)


class EmoCASTUnloadModels:
    DESCRIPTION = ("Frees the loaded EmoCAST models (GPU and CPU memory) once the frames have passed through; "
                   "the next run loads them again. Put it between the Sampler and the video node.")
    CATEGORY = CATEGORY
    FUNCTION = "unload"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The frames, unchanged.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "frames": ("IMAGE", {"tooltip": "Any IMAGE (normally the Sampler's frames): the models are freed once "
                                            "it has been computed, and it is passed on unchanged."}),
        }}

    def unload(self, frames: Any) -> tuple[Any]:
        MODEL_CACHE.release()
        return (frames,)
