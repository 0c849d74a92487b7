"""Grad-CAM heatmaps for any timm backbone or skuvision Classifier, with no user code: where the model
looked for the class it predicted.

The `grad-cam` package (pytorch_grad_cam) computes the maps; this module chooses what it needs:

- the target layer: the last stage timm's `feature_info` names, or else the last module of
  `forward_features` (of the whole forward, for a plain nn.Module) with a spatial (N, C, H, W) output, found
  by forward hooks on the first image;
- how to read that layer as (N, C, H, W): as it is; permuted from (N, H, W, C) (Swin-style stages, told by
  `feature_info`'s channel count); or, for tokens (N, T, C), the model's own prefix tokens
  (`num_prefix_tokens`) dropped and the rest laid out on its patch grid (`patch_embed.grid_size`, or
  `dynamic_feat_size` of the batch's size for models built with `dynamic_img_size`). For tokens the layer
  is the one whose output enters the first block, and the method grad-cam's element-wise Grad-CAM: after the
  first attention every token carries the whole image, and Grad-CAM's one weight per channel, averaged over
  all tokens, then ranks background tokens first (the pointing game of tests/test_explain.py on a
  class-token ViT: 0.31 at the block before the last with Grad-CAM, 1.0 here; 0.13-0.35 vs 0.96-1.0 over
  depths 2 and 4, average pooling and register tokens);
- which output: a Classifier with several heads answers {column: logits}; the map is of one label column's
  logits (the first label column unless `column` says otherwise).

Only the layer's output and what follows it take part in the backward pass: the parameters are frozen for
the call and the layer's output starts a new graph, so nothing is accumulated in `.grad`, the layers before
it keep no activations, and every hook is removed when a batch is done. Memory stays flat over any number
of batches.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from skuvision.errors import SkuvisionError
from skuvision.outputs import new_folder

METHODS = ("gradcam",)
EXPLANATIONS = "explanations"  # the run folder's subfolder of overlays and heatmaps


def check_method(method: str | None, key: str = "explain") -> str | None:
    """None (no explanations) or a method this module runs; anything else is refused in one line."""
    if method in (None, False, "", "none"):
        return None
    if method not in METHODS:
        raise SkuvisionError(f"{key}={method}: use one of {', '.join(METHODS)} (or null for none)")
    return str(method)


@dataclass
class Target:
    """The layer Grad-CAM reads, and how its output becomes (N, C, H, W)."""

    name: str  # its name in the backbone (named_modules)
    layer: nn.Module
    layout: str  # "NCHW", "NHWC" or "tokens"
    prefix_tokens: int = 0
    elementwise: bool = False  # grad-cam's GradCAMElementWise instead of GradCAM (tokens: see above)


class ColumnLogits(nn.Module):
    """A model's logits as one tensor, as grad-cam needs: one column's of a {column: logits} answer."""

    def __init__(self, model: nn.Module, column: str | None):
        super().__init__()
        self.model = model
        self.column = column

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        return out[self.column] if isinstance(out, dict) else out


def backbone_of(model: nn.Module) -> nn.Module:
    """The timm model inside a skuvision Classifier, or the model itself."""
    return getattr(model, "backbone", model)


def label_column(model: nn.Module, column: str | None) -> str | None:
    """The column whose logits are explained (None for a model with one output). Tag columns are refused:
    their tags are independent yes/no answers, not one predicted class."""
    heads = getattr(model, "heads", None)
    if getattr(model, "multi_head", None) is None or not heads:
        if column:
            raise SkuvisionError(f"explain column={column!r}: this model has one output, no columns")
        return None
    labels = [h.column for h in heads if h.kind == "label"]
    if column is None:
        if not labels:
            raise SkuvisionError("explain: this model has only tag columns; Grad-CAM explains a label column")
        return labels[0]
    if column not in labels:
        raise SkuvisionError(
            f"explain column={column!r}: not a label column of this model; use one of {labels}"
        )
    return column


def find_target(model: nn.Module, image: torch.Tensor) -> Target:
    """The layer to explain for `model` (a Classifier or a timm model), probed with `image` (1, C, H, W)."""
    backbone = backbone_of(model)
    info = getattr(backbone, "feature_info", None)
    stages = [i for i in info if isinstance(i, dict) and i.get("module")] if isinstance(info, list) else []
    if stages:
        name, channels = stages[-1]["module"], int(stages[-1].get("num_chs") or 0)
        output = module_output(backbone, name, image)
        if output.ndim == 3:
            prefix = int(getattr(backbone, "num_prefix_tokens", 0) or 0)
            name = first_block_input(backbone, image)
            return Target(name, backbone.get_submodule(name), "tokens", prefix, elementwise=True)
        if output.ndim == 4 and channels and output.shape[1] != channels and output.shape[-1] == channels:
            return Target(name, backbone.get_submodule(name), "NHWC")
        if output.ndim == 4:
            return Target(name, backbone.get_submodule(name), "NCHW")
    name = last_spatial_module(backbone, image)
    return Target(name, backbone.get_submodule(name), "NCHW")


def first_block_input(backbone: nn.Module, image: torch.Tensor) -> str:
    """The name of the last module to finish, on a forward pass, whose output is what the first of the
    model's `blocks` takes: the tokens before any attention mixed them."""
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise SkuvisionError(
            f"{type(backbone).__name__}: its stages give tokens but it has no `blocks` to tell where they "
            "enter the first attention; Grad-CAM has no layer to read"
        )
    names = {module: name for name, module in backbone.named_modules() if name}
    finished: list[tuple[str, torch.Tensor]] = []
    entered: list[tuple[int, torch.Tensor]] = []  # (modules finished by then, the first block's input)
    handles = [m.register_forward_hook(lambda m, i, o: finished.append((names[m], o))) for m in names]
    handles.append(
        blocks[0].register_forward_pre_hook(lambda m, args: entered.append((len(finished), args[0])))
    )
    forward_with(backbone, image, handles)
    count, tokens = entered[0] if entered else (0, None)
    before = [name for name, out in finished[:count] if out is tokens]
    if not before:
        raise SkuvisionError(
            f"{type(backbone).__name__}: no module's output is its first block's input; Grad-CAM has no "
            "layer to read"
        )
    return before[-1]


def forward_with(backbone: nn.Module, image: torch.Tensor, hooks: list) -> None:
    """One pass of the layers before the head, without gradients, in eval mode; the hooks removed after."""
    try:
        with torch.no_grad(), evaluating(backbone):
            features_call(backbone)(image)
    finally:
        for hook in hooks:
            hook.remove()


def features_call(backbone: nn.Module) -> Callable:
    """What runs the layers before the head: timm's forward_features, else the whole forward."""
    return getattr(backbone, "forward_features", backbone)


@contextmanager
def evaluating(model: nn.Module):
    """Eval mode (batch norm reads its running statistics, nothing updates them) for the block; the
    caller's mode afterwards."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def module_output(backbone: nn.Module, name: str, image: torch.Tensor) -> torch.Tensor:
    """The output of the named submodule for `image`."""
    seen: list = []
    forward_with(
        backbone, image, [backbone.get_submodule(name).register_forward_hook(lambda m, i, o: seen.append(o))]
    )
    if not seen or not isinstance(seen[-1], torch.Tensor):
        raise SkuvisionError(
            f"{type(backbone).__name__}: its feature_info names {name}, which gave no tensor on a forward "
            "pass; Grad-CAM cannot read it"
        )
    return seen[-1]


def last_spatial_module(backbone: nn.Module, image: torch.Tensor) -> str:
    """The name of the last module to finish, on a forward pass, with an (N, C, H, W) output of more than
    one cell: the last spatial stage of a network timm does not describe."""
    names = {module: name for name, module in backbone.named_modules() if name}
    order: list[str] = []

    def record(module, inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[-1] * output.shape[-2] > 1:
            order.append(names[module])

    forward_with(backbone, image, [module.register_forward_hook(record) for module in names])
    if not order:
        raise SkuvisionError(
            f"{type(backbone).__name__}: no layer has a spatial (N, C, H, W) output, so Grad-CAM has no map "
            "to draw; explanations need a convolutional or patch-token backbone"
        )
    return order[-1]


def reshape_for(target: Target, backbone: nn.Module, height: int, width: int) -> Callable | None:
    """grad-cam's reshape_transform for the target's layout at this input size (None: already NCHW)."""
    if target.layout == "NCHW":
        return None
    if target.layout == "NHWC":
        return lambda t: t.permute(0, 3, 1, 2)
    patch_embed = getattr(backbone, "patch_embed", None)
    if patch_embed is None:
        raise SkuvisionError(
            f"{type(backbone).__name__}: its layer {target.name} gives tokens but the model has no "
            "patch_embed to tell their grid; Grad-CAM cannot place them on the image"
        )
    if getattr(backbone, "dynamic_img_size", False) and hasattr(patch_embed, "dynamic_feat_size"):
        grid = tuple(int(g) for g in patch_embed.dynamic_feat_size((height, width)))
    else:
        grid = tuple(int(g) for g in patch_embed.grid_size)
    prefix = target.prefix_tokens

    def to_map(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] != prefix + grid[0] * grid[1]:
            raise SkuvisionError(
                f"{type(backbone).__name__}: {tokens.shape[1]} tokens at {target.name} are not {prefix} "
                f"prefix token(s) + a {grid[0]}x{grid[1]} patch grid; feed images of the size the model was "
                "built for"
            )
        patches = tokens[:, prefix:, :]
        return patches.reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[2]).permute(0, 3, 1, 2)

    return to_map


@contextmanager
def frozen(model: nn.Module):
    """No parameter requires a gradient in the block; each one's own setting afterwards."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class Explainer:
    """Grad-CAM of one model, target layer found on the first batch and kept.

    `explainer(images)` -> float32 heatmaps (N, H, W) in [0, 1] at the batch's size, each for `classes[i]`
    (default: the class the explained output ranks first for that image)."""

    def __init__(self, model: nn.Module, column: str | None = None):
        self.model = model
        self.column = label_column(model, column)
        self.target: Target | None = None

    def __call__(self, images: torch.Tensor, classes: list[int] | None = None) -> np.ndarray:
        from pytorch_grad_cam import GradCAM, GradCAMElementWise
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if images.ndim != 4:
            raise ValueError(f"images of shape {tuple(images.shape)}: expected a batch (N, C, H, W)")
        device = next(self.model.parameters()).device
        with torch.inference_mode(False), torch.enable_grad(), evaluating(self.model), frozen(self.model):
            images = images.to(device).float().clone()  # a normal tensor, also when made in inference mode
            if self.target is None:
                self.target = find_target(self.model, images[:1])
            backbone = backbone_of(self.model)
            reshape = reshape_for(self.target, backbone, images.shape[-2], images.shape[-1])
            # The layer's output starts the graph: the backward pass stops there.
            start = self.target.layer.register_forward_hook(
                lambda m, i, out: out.detach().requires_grad_(True), prepend=True
            )
            cam = (GradCAMElementWise if self.target.elementwise else GradCAM)(
                model=ColumnLogits(self.model, self.column),
                target_layers=[self.target.layer],
                reshape_transform=reshape,
            )
            try:
                targets = None if classes is None else [ClassifierOutputTarget(int(c)) for c in classes]
                maps = cam(input_tensor=images, targets=targets)
            finally:
                # Not `with cam:`: its __exit__ swallows an IndexError (e.g. a class index out of range),
                # which would leave no maps and no error. release() is all that __exit__ does besides.
                cam.activations_and_grads.release()
                cam.outputs = None  # the last output, which holds the graph until the next call
                start.remove()
        return np.asarray(maps, dtype=np.float32)


def explain(
    model: nn.Module, batch: torch.Tensor, classes: list[int] | None = None, column: str | None = None
) -> np.ndarray:
    """Grad-CAM heatmaps (N, H, W), float32 in [0, 1], of a normalized batch (what the model takes), for
    `classes` (default: each image's predicted class). For many batches keep one Explainer instead: it
    finds the target layer once."""
    return Explainer(model, column)(batch, classes)


def overlay(image: torch.Tensor | np.ndarray, heatmap: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """The heatmap in colour over the image: uint8 (H, W, 3) RGB. `image`: uint8 (C, H, W) with 1 or 3
    channels at the heatmap's size (what the model saw, before normalization)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    pixels = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[1:] != heatmap.shape:
        raise ValueError(f"image {pixels.shape} and heatmap {heatmap.shape}: expected (C, H, W) and (H, W)")
    rgb = np.repeat(pixels, 3, axis=0) if pixels.shape[0] == 1 else pixels[:3]
    rgb = np.ascontiguousarray(rgb.transpose(1, 2, 0), dtype=np.float32) / 255.0
    return show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=image_weight)


def write_explanations(
    model: nn.Module,
    batches,
    to_model_input: Callable[[torch.Tensor], torch.Tensor],
    classes: list[int],
    errors: list[str],
    run_folder: Path,
    device: torch.device | str = "cpu",
    column: str | None = None,
) -> list[str]:
    """For each row of `batches` (uint8 images at the model's size, and each one's read error), in order:
    `explanations/<row>.png` (the overlay) and `<row>.npy` (the heatmap, float32, at the model's input size)
    for `classes[row]`; the PNGs' paths relative to `run_folder` ("" for an unreadable row). The folder gets
    its name only once every file is written (skuvision.outputs.new_folder)."""
    width = len(str(max(len(classes) - 1, 0)))
    relative = [""] * len(classes)
    explainer = Explainer(model.to(device), column)
    row = 0
    with new_folder(Path(run_folder) / EXPLANATIONS) as folder:
        for images, _ in batches:
            rows = range(row, row + len(images))
            row += len(images)
            keep = [i for i, r in enumerate(rows) if not errors[r]]
            if not keep:
                continue
            images = images[keep]
            with torch.no_grad():
                x = to_model_input(images.to(device))
            maps = explainer(x, [classes[rows[i]] for i in keep])
            for image, heatmap, i in zip(images, maps, keep, strict=True):
                name = f"{rows[i]:0{width}d}"
                np.save(folder / f"{name}.npy", heatmap)
                Image.fromarray(overlay(image, heatmap)).save(folder / f"{name}.png")
                relative[rows[i]] = f"{EXPLANATIONS}/{name}.png"
    if row != len(classes):
        raise ValueError(f"{row} images explained for {len(classes)} rows")
    return relative
