"""The from-scratch segmentation network (`SEG_MODEL=unet`: a monai 2-D U-Net) and the loss.

It starts from random weights and learns from the project's own annotations. Class 0 is
background; class k (1..K) is the k-th label. Pretrained families live in segmentation/families.py.

Up-sampling is a resize-convolution (bilinear x2, then a 3x3 convolution): monai's transposed
convolution (kernel 3, stride 2; monai refuses kernel 4) overlaps its kernel unevenly, which
painted a regular 2-pixel grid of holes into the first trained models' masks (measured:
tests/unit/test_seg_checkerboard.py). Versions saved before this change say nothing about
up-sampling and are rebuilt with the transposed convolution they were trained with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from monai.losses import DiceCELoss
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.nets import UNet

from segmentation.normalization import Normalization

# Four stride-2 stages: inputs whose sides are multiples of 16 pass through unchanged.
DEFAULT_CHANNELS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class NetworkConfig:
    """What is needed to rebuild the same network from a saved state_dict."""

    n_classes: int  # labels + background
    channels: tuple[int, ...] = DEFAULT_CHANNELS
    in_channels: int = 3
    num_res_units: int = 2
    dropout: float = 0.0
    upsample: str = "resize"  # "resize" (bilinear + conv) | "transposed" (versions saved before it)

    family = "unet"  # not a field: what `families.network_from_json` dispatches on

    @property
    def normalization(self) -> Normalization:
        """Each image standardised by its own statistics."""
        return Normalization()

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this (2 ** number of down-sampling stages)."""
        return 2 ** (len(self.channels) - 1)

    def to_json(self) -> dict:
        return {"family": self.family} | asdict(self) | {"channels": list(self.channels)}

    @classmethod
    def from_json(cls, data: dict) -> NetworkConfig:
        """A saved config; one without `upsample` predates the resize-convolution."""
        fields = {key: value for key, value in data.items() if key != "family"}
        return cls(**(fields | {"channels": tuple(data["channels"]), "upsample": data.get("upsample", "transposed")}))


def build_network(config: NetworkConfig) -> torch.nn.Module:
    """A 2-D U-Net mapping Bx3xHxW float32 (normalised) to BxCxHxW logits, C = config.n_classes."""
    if config.n_classes < 2:
        raise ValueError(f"need at least one label plus background, got n_classes={config.n_classes}")
    if config.upsample not in ("resize", "transposed"):
        raise ValueError(f"unknown upsample {config.upsample!r}; expected 'resize' or 'transposed'")
    unet = ResizeConvUNet if config.upsample == "resize" else UNet
    return unet(
        spatial_dims=2,
        in_channels=config.in_channels,
        out_channels=config.n_classes,
        channels=config.channels,
        strides=(2,) * (len(config.channels) - 1),
        num_res_units=config.num_res_units,
        norm="batch",
        dropout=config.dropout,
    )


class ResizeConvUNet(UNet):
    """monai's UNet with each transposed convolution replaced by bilinear up-sampling and a
    stride-1 convolution: every output pixel sees the same kernel, so no checkerboard."""

    def _get_up_layer(self, in_channels: int, out_channels: int, strides: int, is_top: bool) -> torch.nn.Module:
        conv = Convolution(
            self.dimensions,
            in_channels,
            out_channels,
            strides=1,
            kernel_size=self.up_kernel_size,
            act=self.act,
            norm=self.norm,
            dropout=self.dropout,
            bias=self.bias,
            conv_only=is_top and self.num_res_units == 0,
            adn_ordering=self.adn_ordering,
        )
        resize = torch.nn.Upsample(scale_factor=strides, mode="bilinear", align_corners=False)
        layers: list[torch.nn.Module] = [resize, conv]
        if self.num_res_units > 0:
            layers.append(
                ResidualUnit(
                    self.dimensions,
                    out_channels,
                    out_channels,
                    strides=1,
                    kernel_size=self.kernel_size,
                    subunits=1,
                    act=self.act,
                    norm=self.norm,
                    dropout=self.dropout,
                    bias=self.bias,
                    last_conv_only=is_top,
                    adn_ordering=self.adn_ordering,
                )
            )
        return torch.nn.Sequential(*layers)


def build_loss(kind: str = "dice_ce") -> torch.nn.Module:
    """Loss on (BxCxHxW logits, Bx1xHxW int64 class indices).

    "dice_ce": monai DiceCELoss (softmax, one-hot target), the training default. Dice is pooled
        over the whole batch (batch=True), not taken per crop: a crop without any pixel of a rare
        class would otherwise score Dice ~0 for the slightest false positive, which teaches the
        network to avoid that class (on a tuning split of the training images, 160 steps: pooled
        Dice was ahead in 3 of 4 paired runs, by +0.13 DSB2018 and +0.10 / +0.03 yeast mean Dice,
        level in the fourth).
    "ce": plain cross-entropy (the benchmark's baseline).
    """
    if kind == "dice_ce":
        return DiceCELoss(softmax=True, to_onehot_y=True, include_background=True, batch=True)
    if kind == "ce":
        cross_entropy = torch.nn.CrossEntropyLoss()
        return _SqueezeTarget(cross_entropy)
    raise ValueError(f"unknown loss {kind!r}; expected 'dice_ce' or 'ce'")


class _SqueezeTarget(torch.nn.Module):
    """Adapts CrossEntropyLoss to the Bx1xHxW target layout monai losses take."""

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, target[:, 0].long())
