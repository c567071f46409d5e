"""Image encoders: a torchvision CNN trunk projected to the embedding size.

TIRG (Vo et al., CVPR 2019) uses ResNet-18; CCNet uses ResNet-50/152 and DenseNet-169.
Models are built with ``weights=None``; ImageNet weights come only from a local file
(``pretrained_path``) or the local torch hub cache (``pretrained_path="torch_hub"``),
never from the network.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torchvision
from torch import nn

log = logging.getLogger(__name__)

HUB_CACHE = "torch_hub"
# name -> (torchvision constructor, torchvision weights enum name, last-map channels,
#          intermediate-map channels)
BACKBONES: dict[str, tuple[str, str, int, int]] = {
    "resnet18": ("resnet18", "ResNet18_Weights", 512, 256),
    "resnet50": ("resnet50", "ResNet50_Weights", 2048, 1024),
    "resnet152": ("resnet152", "ResNet152_Weights", 2048, 1024),
    "densenet169": ("densenet169", "DenseNet169_Weights", 1664, 1280),
}
# Old DenseNet checkpoints name layers 'norm.1' etc. (torchvision densenet._load_state_dict).
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def hub_weights_file(backbone: str) -> Path:
    """Where torchvision would cache ``backbone``'s ImageNet weights (not downloaded here)."""
    ctor, weights_name, _, _ = BACKBONES[backbone]
    weights = getattr(torchvision.models, weights_name).IMAGENET1K_V1
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def load_imagenet_weights(trunk: nn.Module, backbone: str, pretrained_path: str) -> None:
    """Load a torchvision ImageNet state dict from a local file into ``trunk``."""
    path = hub_weights_file(backbone) if pretrained_path == HUB_CACHE else Path(pretrained_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained_path: no weights file at {path} for image_backbone={backbone!r} "
            f"(weights are never downloaded; put the torchvision ImageNet file there)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if missing or unexpected:
        raise ValueError(
            f"pretrained_path {path} does not fit {backbone}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    log.info("loaded ImageNet weights for %s from %s", backbone, path)


class Backbone(nn.Module):
    """CNN trunk: images (B, 3, H, W) -> (intermediate map (B, C_mid, H/16, W/16),
    last map (B, C, H/32, W/32)). ``channels`` is C, ``mid_channels`` is C_mid."""

    def __init__(self, name: str = "resnet18", pretrained_path: str | None = None):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"image_backbone must be one of {sorted(BACKBONES)}, got {name!r}")
        ctor, _, self.channels, self.mid_channels = BACKBONES[name]
        net = getattr(torchvision.models, ctor)(weights=None)
        if pretrained_path is not None:
            load_imagenet_weights(net, name, pretrained_path)
        if name.startswith("resnet"):
            self.stem = nn.Sequential(
                net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3
            )
            self.head = net.layer4
        else:  # densenet: split after denseblock3 (its transition halves the size again)
            f = net.features
            self.stem = nn.Sequential(
                f.conv0,
                f.norm0,
                f.relu0,
                f.pool0,
                f.denseblock1,
                f.transition1,
                f.denseblock2,
                f.transition2,
                f.denseblock3,
            )
            self.head = nn.Sequential(f.transition3, f.denseblock4, f.norm5, nn.ReLU())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mid = self.stem(images)
        return mid, self.head(mid)


class ImageEncoder(nn.Module):
    """Global image feature as in the TIRG code: average-pool the last map, then a linear
    layer to ``embed_dim``. forward: images (B, 3, H, W) -> (feature (B, D), map (B, C, h, w))."""

    def __init__(
        self, embed_dim: int = 512, backbone: str = "resnet18", pretrained_path: str | None = None
    ):
        super().__init__()
        self.backbone = Backbone(backbone, pretrained_path)
        self.channels = self.backbone.channels
        self.fc = nn.Linear(self.channels, embed_dim)

    def project(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Last map (B, C, h, w) -> feature (B, D); reused by composers that edit the map."""
        return self.fc(feature_map.mean(dim=(2, 3)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, feature_map = self.backbone(images)
        return self.project(feature_map), feature_map
