"""Models of a parity fixture, with weights computed from a formula instead of read from weight files.

A compact parity fixture (``tests/fixtures/parity_*``) holds configs, tokenizer files, inputs and the official
outputs, plus a short recipe, ``weights.json``; it holds no weights. Every weight of its three models (the Net,
the VAE, the CLIP text model) is a pure function of the tensor's key in the weights file, the model's seed and
gain from the recipe, and the tensor's shape. The formula (recipe ``"formula": "name-seeded-v1"``):

.. code-block:: text

    g = torch.Generator().manual_seed(seed + zlib.crc32(key.encode("utf-8")))   # CPU generator
    x = torch.randn(shape, generator=g)                                         # float32
    ndim >= 2:                          w = x * (gain / prod(shape[1:]) ** 0.5)  # fan-in scaled
    ndim <= 1 and key ends in "weight": w = 1.0 + 0.1 * gain * x                  # norm scales
    ndim <= 1 otherwise:                w = 0.05 * gain * x                       # biases
    w = w.half()                                                                 # then the model's dtype

``key`` is the name the tensor has in the weights file the official tools write: the official ``net.pth``
layout for the Net (the same names as our ``EmoCASTNet.state_dict()``), diffusers' ``AutoencoderKL`` names
for the VAE, and ``text_model.…`` for the CLIP text model (transformers 5 names that model's own parameters
without the ``text_model.`` prefix, so the prefix is added back). The formula covers parameters only; buffers
(the motion modules' sinusoidal ``pe``, CLIP's ``position_ids``) keep the values the module computes when it is
built, exactly as they would be after loading the official files. Every weight is representable in float16,
so an fp16 copy of the weights is lossless and an fp32 model gets the same values as a file stored in fp16.

Building is memory-lean: parameters are created without storage (on the ``meta`` device) while buffers are
computed for real; each weight is then generated directly in the model's dtype and assigned (no copy), so the
full-size Net (2.5 B parameters) costs one set of weights, about 10 GB in fp32.

:func:`load_parity_models` reads either kind of fixture folder: a compact one (``weights.json``) or one that
holds weight files (``net.safetensors`` or the official ``net.pth``, and ``vae/`` and ``clip/`` with weights).
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from ..checkpoints import load_net
from ..config import NetConfig

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from ..emotion import EmotionTextEncoder
    from ..models.net import EmoCASTNet

FORMULA = "name-seeded-v1"
RECIPE_FILE = "weights.json"
NET_FILES = ("net.safetensors", "net.pth")  # what a fixture with weight files may hold, in this order
CLIP_PREFIX = "text_model."


@dataclass(frozen=True)
class SeedGain:
    """Seed and gain of one model's weights."""

    seed: int
    gain: float


@dataclass(frozen=True)
class WeightsRecipe:
    """The contents of a compact fixture's ``weights.json``."""

    net: SeedGain
    vae: SeedGain
    clip_text: SeedGain

    @classmethod
    def from_json(cls, path: str | Path) -> "WeightsRecipe":
        path = Path(path)
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("formula") != FORMULA:
            raise ValueError(f"{path}: weight formula {data.get('formula')!r} is not supported (expected {FORMULA!r})")
        try:
            return cls(**{part: SeedGain(int(data[part]["seed"]), float(data[part]["gain"]))
                          for part in ("net", "vae", "clip_text")})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: malformed weights recipe ({exc!r})") from exc


class ParityModels(NamedTuple):
    """What the parity tests run: the networks, the VAE and the emotion-text encoder."""

    net: "EmoCASTNet"
    vae: "AutoencoderKL"
    text: "EmotionTextEncoder"


# ---- the formula ---------------------------------------------------------------------------------

def name_seeded_tensor(key: str, shape: torch.Size | tuple[int, ...], seed: int, gain: float,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight called `key` in a weights file, of `shape`, by the formula in the module docstring."""
    shape = tuple(int(s) for s in shape)
    generator = torch.Generator().manual_seed(seed + zlib.crc32(key.encode("utf-8")))
    # In place, in the float32 tensor that is returned for an fp32 model: one temporary (the fp16 rounding).
    value = torch.randn(shape, generator=generator)
    if len(shape) >= 2:
        fan_in = 1
        for size in shape[1:]:
            fan_in *= size
        value.mul_(gain / fan_in ** 0.5)
    elif key.endswith("weight"):
        value.mul_(0.1 * gain).add_(1.0)
    else:
        value.mul_(0.05 * gain)
    if dtype == torch.float32:
        return value.copy_(value.half())
    value = value.half()
    return value if dtype == torch.float16 else value.to(dtype)


def name_seeded_parameters(shapes: Mapping[str, tuple[int, ...]], seed: int, gain: float,
                           dtype: torch.dtype = torch.float32,
                           file_key: Callable[[str], str] = str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, weight) for each ``{name: shape}``, keyed in the formula by ``file_key(name)``, one at a time."""
    for name, shape in shapes.items():
        yield name, name_seeded_tensor(file_key(name), shape, seed, gain, dtype)


def clip_file_key(name: str) -> str:
    """The key a CLIP text-model parameter has in ``model.safetensors``: always under ``text_model.``."""
    return name if name.startswith(CLIP_PREFIX) else CLIP_PREFIX + name


# ---- building without a second copy ---------------------------------------------------------------

@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """While active, every parameter a module registers is moved to the ``meta`` device (no storage, so
    a constructor's random init costs nothing), while buffers are created, and computed, as usual."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def assign_name_seeded_(module: nn.Module, seed: int, gain: float, dtype: torch.dtype = torch.float32,
                        file_key: Callable[[str], str] = str) -> nn.Module:
    """Give every parameter of `module` (built under :func:`parameters_on_meta`) its formula value in
    `dtype`, keep its persistent buffers, and load the result strictly with ``assign=True`` (no copy)."""
    params = dict(module.named_parameters())
    state: dict[str, torch.Tensor] = dict(
        name_seeded_parameters({n: tuple(p.shape) for n, p in params.items()}, seed, gain, dtype, file_key))
    for name, tensor in module.state_dict(keep_vars=True).items():
        if name not in params:  # a persistent buffer, as the module computed it
            state[name] = tensor
    module.load_state_dict(state, strict=True, assign=True)
    del state
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{type(module).__name__}: tensors without data after the name-seeded load: "
                           + ", ".join(left[:8]))
    return module


def build_name_seeded_net(config: NetConfig | str | Path, recipe: SeedGain,
                          dtype: torch.dtype = torch.float32) -> "EmoCASTNet":
    """Our EmoCASTNet for `config` with the formula's weights in `dtype` (buffers cast to `dtype`, as
    :func:`emocast_core.checkpoints.load_net` casts them)."""
    from ..models.net import build_net

    if not isinstance(config, NetConfig):
        config = NetConfig.from_json(config)
    with parameters_on_meta():
        net = build_net(config, device="cpu", dtype=dtype)
    return assign_name_seeded_(net, recipe.seed, recipe.gain, dtype)


def build_name_seeded_vae(vae_dir: str | Path, recipe: SeedGain,
                          dtype: torch.dtype = torch.float32) -> "AutoencoderKL":
    """A diffusers AutoencoderKL from ``vae_dir/config.json`` with the formula's weights, in eval mode."""
    from diffusers import AutoencoderKL

    with parameters_on_meta():
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(vae_dir)))
    assign_name_seeded_(vae, recipe.seed, recipe.gain, dtype)
    return vae.to(dtype=dtype).eval().requires_grad_(False)


def build_name_seeded_clip_text(clip_dir: str | Path, recipe: SeedGain,
                                dtype: torch.dtype = torch.float32) -> "CLIPTextModel":
    """A transformers CLIPTextModel from ``clip_dir/config.json`` with the formula's weights, in eval mode."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_json_file(str(Path(clip_dir) / "config.json"))
    with parameters_on_meta():
        model = CLIPTextModel(config)
    assign_name_seeded_(model, recipe.seed, recipe.gain, dtype, file_key=clip_file_key)
    return model.to(dtype=dtype).eval().requires_grad_(False)


# ---- fixture folders ------------------------------------------------------------------------------

def is_compact(folder: str | Path) -> bool:
    """Whether `folder` is a compact fixture (a weights recipe instead of weight files)."""
    return (Path(folder) / RECIPE_FILE).is_file()


def net_weights_file(folder: str | Path) -> Path:
    """The Net weights of a fixture that holds weight files (``net.safetensors``, else ``net.pth``)."""
    for name in NET_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise FileNotFoundError(f"{folder}: no {RECIPE_FILE} and no Net weights ({' or '.join(NET_FILES)})")


def load_parity_text_encoder(folder: str | Path, dtype: torch.dtype = torch.float32) -> "EmotionTextEncoder":
    """The emotion-text encoder of a fixture folder: tokenizer files from ``clip/``; the text model from the
    recipe (compact fixture) or from the weights in ``clip/``."""
    from transformers import CLIPTokenizer

    from ..emotion import EmotionTextEncoder

    folder = Path(folder)
    if not is_compact(folder):
        return EmotionTextEncoder.from_pretrained(folder / "clip", dtype=dtype)
    recipe = WeightsRecipe.from_json(folder / RECIPE_FILE)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "clip"), local_files_only=True)
    return EmotionTextEncoder(tokenizer, build_name_seeded_clip_text(folder / "clip", recipe.clip_text, dtype))


def load_parity_models(folder: str | Path, dtype: torch.dtype = torch.float32) -> ParityModels:
    """Net, VAE and text encoder of a parity fixture folder, in `dtype`, on the CPU.

    A compact folder (``weights.json``) has its weights rebuilt by the formula; any other folder must hold
    ``net.safetensors`` or ``net.pth`` (official layout, read by :func:`emocast_core.checkpoints.load_net`)
    and diffusers / transformers weights in ``vae/`` and ``clip/``. ``config.json`` is the model config."""
    from diffusers import AutoencoderKL

    folder = Path(folder)
    if is_compact(folder):
        recipe = WeightsRecipe.from_json(folder / RECIPE_FILE)
        net = build_name_seeded_net(folder / "config.json", recipe.net, dtype)
        vae = build_name_seeded_vae(folder / "vae", recipe.vae, dtype)
    else:
        net = load_net(net_weights_file(folder), folder / "config.json", dtype=dtype)
        vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True, torch_dtype=dtype)
    return ParityModels(net, vae, load_parity_text_encoder(folder, dtype))
