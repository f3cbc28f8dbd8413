"""Where the model files live: one documented folder layout, shared by the CLI and the ComfyUI nodes.

    <models>/                       (ComfyUI: ComfyUI/models/emocast/)
      emocast.safetensors           EmoCAST networks (or the released net.pth)
      config.json                   optional: model configuration (default: the released full size)
      vae/                          diffusers AutoencoderKL folder (sd-vae-ft-mse)
      clip/                         HF CLIP ViT-L/14 text model + tokenizer
      wav2vec2/                     HF wav2vec2-base-960h (model + preprocessor_config.json)
      face_analysis/                insightface ONNX: detector, ArcFace recognition, 2d106 landmarks
      separator/                    optional: MDX-Net vocal separator (Kim_Vocal_2.onnx)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NET_FILES = ("emocast.safetensors", "emocast_fp16.safetensors", "net.pth")


@dataclass(frozen=True)
class Requirement:
    what: str
    path: Path
    source: str

    def describe(self) -> str:
        return f"- {self.what}: expected at {self.path}\n  get it from: {self.source}"


@dataclass(frozen=True)
class ModelPaths:
    root: Path
    net: Path
    config: Path | None
    vae: Path
    clip: Path
    wav2vec2: Path
    face_analysis: Path

    @classmethod
    def resolve(cls, root: str | Path, net: str | Path | None = None) -> "ModelPaths":
        """Find every file under `root`; all that is missing is reported in one error."""
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"model folder {root} does not exist; create it and put the EmoCAST model "
                                    f"files in it (see the README's model table)")
        net_path = Path(net) if net is not None else next(
            (root / n for n in NET_FILES if (root / n).is_file()), root / NET_FILES[0])
        config = root / "config.json"
        paths = cls(root=root, net=net_path, config=config if config.is_file() else None, vae=root / "vae",
                    clip=root / "clip", wav2vec2=root / "wav2vec2", face_analysis=root / "face_analysis")
        missing = [r for r in paths.requirements() if not r.path.exists()]
        missing += [r for r in paths._folder_contents() if r.path.parent.exists() and not r.path.exists()]
        if missing:
            lines = "\n".join(r.describe() for r in missing)
            raise FileNotFoundError(f"{len(missing)} model file(s) missing under {root}:\n{lines}")
        return paths

    def requirements(self) -> list[Requirement]:
        return [
            Requirement("EmoCAST networks (net.pth, or emocast.safetensors made by `python -m emocast_core "
                        "convert`)", self.net, "https://huggingface.co/Jmaomao/EmoCAST (net.pth)"),
            Requirement("VAE folder", self.vae, "https://huggingface.co/stabilityai/sd-vae-ft-mse"),
            Requirement("CLIP ViT-L/14 text encoder folder", self.clip,
                        "https://huggingface.co/openai/clip-vit-large-patch14"),
            Requirement("wav2vec2 folder", self.wav2vec2, "https://huggingface.co/facebook/wav2vec2-base-960h"),
            Requirement("insightface model folder", self.face_analysis,
                        "insightface model zoo: antelopev2 (scrfd_10g_bnkps.onnx, glintr100.onnx) and "
                        "buffalo_l (2d106det.onnx)"),
        ]

    def _folder_contents(self) -> list[Requirement]:
        """The one file inside each folder without which the folder cannot load."""
        return [
            Requirement("VAE config", self.vae / "config.json", "https://huggingface.co/stabilityai/sd-vae-ft-mse"),
            Requirement("CLIP config", self.clip / "config.json",
                        "https://huggingface.co/openai/clip-vit-large-patch14"),
            Requirement("wav2vec2 preprocessor config", self.wav2vec2 / "preprocessor_config.json",
                        "https://huggingface.co/facebook/wav2vec2-base-960h"),
        ]
