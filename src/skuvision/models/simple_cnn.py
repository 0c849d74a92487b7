"""simple_cnn: a small CNN trained from scratch, registered with timm so it behaves like any backbone.

Registering it means timm.create_model, resolve_model_data_config, reset_classifier, forward_head and
group_matcher work on it exactly as on resnet50: the rest of skuvision never special-cases it.
"""

from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from skuvision.errors import SkuvisionError

__all__ = ["SimpleCNN"]


def conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class SimpleCNN(nn.Module):
    """3x3 conv-BN-ReLU stages, max-pooled between, then the head: global average pooling and a linear
    classifier; or, with `head_hidden`, average pooling to `pooled` x `pooled` cells, a hidden fully connected
    layer and the classifier (more parameters, little more compute).

    `widths`: two entries give the usual hand-written Fashion-MNIST layout, two convs of widths[0] at full
    size and two of widths[1] at half size; a third adds one conv of widths[2] at a quarter size."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        widths: tuple[int, ...] = (32, 64, 128),
        drop_rate: float = 0.2,
        global_pool: str = "avg",
        head_hidden: int = 0,
        pooled: int = 7,
    ):
        super().__init__()
        if len(widths) not in (2, 3):
            raise SkuvisionError(
                f"model.kwargs.widths={list(widths)}: simple_cnn takes 2 or 3 widths, e.g. [16, 64] (two "
                "stages) or [32, 64, 128] (a third conv at a quarter size)"
            )
        w1, w2 = widths[:2]
        self.num_classes = num_classes
        self.in_chans = in_chans  # timm's save_for_hf reads it (else its default config's: 1 channel)
        self.drop_rate = drop_rate
        self.stem = nn.Sequential(*conv_bn_relu(in_chans, w1))
        self.stages = nn.Sequential(
            nn.Sequential(*conv_bn_relu(w1, w1), nn.MaxPool2d(2)),
            nn.Sequential(*conv_bn_relu(w1, w2), *conv_bn_relu(w2, w2), nn.MaxPool2d(2)),
            *([nn.Sequential(*conv_bn_relu(w2, widths[2]))] if len(widths) == 3 else []),
        )
        self.num_features = widths[-1]
        if head_hidden:
            self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(pooled), nn.Flatten(1))
            self.pre_logits = nn.Sequential(
                nn.Linear(self.num_features * pooled * pooled, head_hidden),
                nn.BatchNorm1d(head_hidden),
                nn.ReLU(inplace=True),
            )
        else:
            self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
            self.pre_logits = nn.Identity()
        self.head_hidden_size = head_hidden or self.num_features
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)"}  # the head (pre_logits, fc): the rest

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(self.global_pool(x))
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs(
    {
        "simple_cnn": {
            "input_size": (1, 28, 28),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "mean": (0.5,),
            "std": (0.5,),
            "num_classes": 10,
            "first_conv": "stem.0",
            "classifier": "fc",
        }
    }
)


@register_model
def simple_cnn(pretrained: bool = False, **kwargs) -> SimpleCNN:
    return build_model_with_cfg(SimpleCNN, "simple_cnn", pretrained, **kwargs)
