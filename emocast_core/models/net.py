"""The container whose state dict is the released `net.pth`: five networks under their official prefixes."""
from __future__ import annotations

import torch
from torch import nn

from ..config import NetConfig
from .audio_projection import AudioProjection
from .denoising_unet import DenoisingUNet
from .face_locator import FaceLocator
from .face_projection import FaceProjection
from .reference_net import ReferenceNet

# The five networks: attribute names of EmoCASTNet and the key prefixes of the released net.pth.
REFERENCE_UNET, DENOISING_UNET, FACE_LOCATOR, FACE_PROJECTION, AUDIO_PROJECTION = PREFIXES = (
    "reference_unet", "denoising_unet", "face_locator", "imageproj", "audioproj")


class EmoCASTNet(nn.Module):
    def __init__(self, config: NetConfig, zero_init: bool = True) -> None:
        super().__init__()
        self.config = config
        self.reference_unet = ReferenceNet(config)
        self.denoising_unet = DenoisingUNet(config, zero_init)
        self.face_locator = FaceLocator(config.face_locator, zero_init)
        self.imageproj = FaceProjection(config.face_projection)
        self.audioproj = AudioProjection(config.audio_projection)


def build_net(config: NetConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              zero_init: bool = True) -> EmoCASTNet:
    """Build the networks; on the "meta" device nothing is allocated (for layout checks and fast loading)."""
    with torch.device(device):
        net = EmoCASTNet(config, zero_init)
    return net.to(dtype=dtype)
