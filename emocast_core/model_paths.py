"""Where the model files live: one documented folder layout, shared by the CLI and the ComfyUI nodes.

    <models>/                       (ComfyUI: ComfyUI/models/emocast/)
      emocast.safetensors           EmoCAST networks (or the released net.pth)
      config.json                   optional: model configuration (default: the released full size)
      vae/                          diffusers AutoencoderKL folder (sd-vae-ft-mse)
      clip/                         HF CLIP ViT-L/14 text model + tokenizer
      wav2vec2/                     HF wav2vec2-base-960h (model + preprocessor_config.json)
      face_analysis/                insightface ONNX: detector, ArcFace recognition, 2d106 landmarks
      separator/                    optional: MDX-Net vocal separator (Kim_Vocal_2.onnx)

vae/, clip/ and wav2vec2/ can each be replaced by a single weights file (`vae_file`, `clip_file` with the
tokenizer of `tokenizer_dir` or else of clip/, `wav2vec2_file`), e.g. those in ComfyUI's own model folders;
see `single_file.py`.
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
    vae_file: Path | None = None  # a single VAE weights file used instead of vae/
    clip_file: Path | None = None  # a single CLIP-L text-encoder file used instead of clip/'s model
    tokenizer_dir: Path | None = None  # the CLIP tokenizer (vocab.json, merges.txt) for clip_file
    wav2vec2_file: Path | None = None  # a single wav2vec2 weights file used instead of wav2vec2/

    @classmethod
    def resolve(cls, root: str | Path, net: str | Path | None = None, vae_file: str | Path | None = None,
                clip_file: str | Path | None = None, tokenizer_dir: str | Path | None = None,
                wav2vec2_file: str | Path | None = None) -> "ModelPaths":
        """Find every file under `root` (the overrides replace their sub-folder); all that is missing is
        reported in one error."""
        root = Path(root).expanduser()
        if root.is_file():
            raise ValueError(f"the model folder {root} is a file; give the folder that holds it (with vae/, clip/, "
                             "wav2vec2/ and face_analysis/ beside it), or pass the file as --net")
        if not root.is_dir():
            raise FileNotFoundError(f"model folder {root} does not exist; create it and put the EmoCAST model "
                                    f"files in it (see the README's model table)")
        net_path = Path(net) if net is not None else next(
            (root / n for n in NET_FILES if (root / n).is_file()), root / NET_FILES[0])
        config = root / "config.json"
        paths = cls(root=root, net=net_path, config=config if config.is_file() else None, vae=root / "vae",
                    clip=root / "clip", wav2vec2=root / "wav2vec2", face_analysis=root / "face_analysis",
                    vae_file=_optional_path(vae_file), clip_file=_optional_path(clip_file),
                    tokenizer_dir=_optional_path(tokenizer_dir) or (root / "clip" if clip_file else None),
                    wav2vec2_file=_optional_path(wav2vec2_file))
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
            Requirement("VAE file" if self.vae_file else "VAE folder", self.vae_file or self.vae,
                        "https://huggingface.co/stabilityai/sd-vae-ft-mse"),
            Requirement("CLIP ViT-L/14 text encoder file" if self.clip_file else "CLIP ViT-L/14 text encoder folder",
                        self.clip_file or self.clip, "https://huggingface.co/openai/clip-vit-large-patch14"),
            Requirement("wav2vec2 file" if self.wav2vec2_file else "wav2vec2 folder",
                        self.wav2vec2_file or self.wav2vec2, "https://huggingface.co/facebook/wav2vec2-base-960h"),
            Requirement("insightface model folder", self.face_analysis,
                        "insightface model zoo: antelopev2 (scrfd_10g_bnkps.onnx, glintr100.onnx) and "
                        "buffalo_l (2d106det.onnx)"),
        ] + ([Requirement("CLIP tokenizer folder (vocab.json, merges.txt)", self.tokenizer_dir,
                          "ComfyUI's comfy/sd1_tokenizer, or https://huggingface.co/openai/clip-vit-large-patch14")]
             if self.clip_file else [])

    def _folder_contents(self) -> list[Requirement]:
        """The one file inside each folder without which the folder cannot load (folders replaced by a
        single file are not needed; a CLIP file still needs its tokenizer)."""
        clip = "https://huggingface.co/openai/clip-vit-large-patch14"
        contents = [
            Requirement("VAE config", self.vae / "config.json", "https://huggingface.co/stabilityai/sd-vae-ft-mse")
            if self.vae_file is None else None,
            Requirement("CLIP config", self.clip / "config.json", clip) if self.clip_file is None else
            Requirement("CLIP tokenizer vocabulary", self.tokenizer_dir / "vocab.json", clip),
            Requirement("wav2vec2 preprocessor config", self.wav2vec2 / "preprocessor_config.json",
                        "https://huggingface.co/facebook/wav2vec2-base-960h") if self.wav2vec2_file is None else None,
        ]
        return [r for r in contents if r is not None]


def _optional_path(path: str | Path | None) -> Path | None:
    return None if path is None else Path(path).expanduser()
