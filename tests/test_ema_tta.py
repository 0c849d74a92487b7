"""Weight EMA, test-time augmentation and the shift-and-flip preset do what they say."""

import json
from pathlib import Path

import pytest
import torch
from pytorch_lightning import Callback, LightningModule, seed_everything
from torch.optim.swa_utils import AveragedModel

from skuvision.assembly import build, build_trainer, instantiate_callbacks
from skuvision.callbacks import WeightEMA, warmed_up_decay
from skuvision.checkpoints import load_classifier
from skuvision.data.augment import ShiftFlip
from skuvision.host_reads import counting_host_reads
from skuvision.tasks.evaluate import evaluate
from skuvision.tasks.train import train
from skuvision.tta import tta_logits, views
from tests.helpers import compose_cfg, quick_overrides


class WeightsAfterEachStep(Callback):
    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: v.detach().clone() for k, v in pl_module.backbone.named_parameters()})


@pytest.mark.parametrize("warmup", [False, True])
def test_saved_and_tested_weights_are_the_ema_of_the_steps(tmp_path, data_root, warmup):
    overrides = quick_overrides("fashion_mnist", data_root) + [
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=1",
        "trainer.precision=32",
        "callbacks.ema.decay=0.8",
        f"callbacks.ema.warmup={warmup}",
        "callbacks.lr_monitor=null",
    ]
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg)
    probe = WeightsAfterEachStep()
    callbacks = instantiate_callbacks(cfg.callbacks) + [probe]
    build_trainer(cfg, callbacks=callbacks).fit(module, datamodule=datamodule)

    expected = dict(probe.steps[0])  # the first update copies the weights
    for n, weights in enumerate(probe.steps[1:], start=1):
        decay = min(0.8, (1 + n) / (10 + n)) if warmup else 0.8
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    assert not torch.allclose(
        expected["fc.weight"], probe.steps[-1]["fc.weight"]
    )  # the EMA is not the last step
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for name, value in expected.items():
        torch.testing.assert_close(saved[f"backbone.{name}"], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module.backbone.get_parameter(name), value, rtol=1e-5, atol=1e-6)


def test_the_decay_warms_up_to_its_value():
    assert [round(warmed_up_decay(0.998, n), 4) for n in (0, 1, 10, 2000, 10000)] == [
        0.1,
        0.1818,
        0.55,
        0.9955,
        0.998,
    ]
    with pytest.raises(Exception, match=r"callbacks\.ema\.decay=1\.5 must be in \[0, 1\]"):
        WeightEMA(decay=1.5)


class LinearBatchNorm(LightningModule):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))


def torch_update(averages, currents, updates):
    """The update as it was, through torch's AveragedModel: its checkpoints must resume alike."""
    if not averages[0].is_floating_point():
        for average, current in zip(averages, currents, strict=True):
            average.copy_(current)
        return
    decay = warmed_up_decay(0.9, int(updates))
    for average, current in zip(averages, currents, strict=True):
        average.lerp_(current, 1 - decay)


def test_the_update_is_torchs_average_with_nothing_read_on_the_host():
    torch.manual_seed(0)
    model = LinearBatchNorm()
    ema = WeightEMA(decay=0.9)
    ema.setup(None, model, "fit")
    reference = AveragedModel(model, use_buffers=True, multi_avg_fn=torch_update)
    for _ in range(6):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        model.layers(torch.randn(8, 4))  # BatchNorm's statistics and step counter move
        with counting_host_reads() as reads:
            ema.average.update_parameters(model)  # what Lightning calls after a step
        assert reads.reads == {}, reads.describe(None)
        reference.update_parameters(model)
        ours, theirs = ema.average.state_dict(), reference.state_dict()
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            torch.testing.assert_close(ours[key], value, rtol=1e-6, atol=1e-7, msg=key)
    assert int(theirs["n_averaged"]) == ema.updates == 6


def test_flip_tta_logits_are_the_mean_of_the_two_passes():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    images = torch.randn(5, 3, 8, 8)
    expected = (model(images) + model(images.flip(-1))) / 2
    torch.testing.assert_close(tta_logits(model, images, "flip"), expected)
    assert torch.equal(tta_logits(model, images, "none"), model(images))
    shifted = views(images, "flip_shift")
    assert len(shifted) == 6 and torch.equal(shifted[2][..., 1:, 1:], images[..., :-1, :-1])


def test_tta_reaches_test_eval_and_metrics_json(tmp_path, data_root):
    overrides = quick_overrides("fashion_mnist", data_root) + [
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.precision=32",
        "tta=flip",
    ]
    metrics = train(compose_cfg("train", overrides, tmp_path / "run"))
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["tta"] == "flip" and written["test/acc"] == pytest.approx(metrics["test/acc"])
    checkpoint = written["checkpoint"]
    assert load_classifier(checkpoint).tta == "flip"
    as_trained = evaluate(
        compose_cfg("eval", [f"ckpt_path={checkpoint}", "trainer.precision=32"], tmp_path / "e1")
    )
    assert as_trained["test/acc"] == pytest.approx(written["test/acc"], abs=1e-6)
    plain = compose_cfg(
        "eval", [f"ckpt_path={checkpoint}", "trainer.precision=32", "tta=none"], tmp_path / "e2"
    )
    evaluate(plain)
    assert json.loads((tmp_path / "e2" / "metrics.json").read_text())["tta"] == "none"


def test_shift_flip_moves_each_image_by_whole_pixels_within_the_pad():
    torch.manual_seed(0)
    images = torch.rand(64, 1, 20, 20)
    out = ShiftFlip(pad=0.1, hflip=0.5).on_batch(images)  # up to 2 px
    flipped = 0
    for image, moved in zip(images, out, strict=True):
        matches = [
            (dy, dx, flip)
            for flip in (False, True)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(shift_with_zeros(image.flip(-1) if flip else image, dy, dx), moved)
        ]
        assert matches, "not a whole-pixel shift of the image (or of its mirror)"
        flipped += matches[0][2]
    assert 16 < flipped < 48


def test_flip_alone_mirrors_whole_images_and_copies_nothing_else():
    """augment=flip (pad 0): each image comes out as it was or mirrored, a share of each."""
    torch.manual_seed(0)
    images = torch.rand(64, 1, 20, 20)
    out = ShiftFlip(pad=0.0, hflip=0.5).on_batch(images)
    mirrored = [torch.equal(o, i.flip(-1)) for i, o in zip(images, out, strict=True)]
    kept = [torch.equal(o, i) for i, o in zip(images, out, strict=True)]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True))
    assert 16 < sum(mirrored) < 48
    assert ShiftFlip(pad=0.0, hflip=0.0).on_batch(images) is images


def shift_with_zeros(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        ..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_ema_off_leaves_the_last_step(tmp_path, data_root):
    overrides = quick_overrides("fashion_mnist", data_root) + [
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "callbacks.ema=null",
        "test=false",
    ]
    train(compose_cfg("train", overrides, tmp_path / "run"))
    state = torch.load(Path(tmp_path / "run" / "checkpoints" / "last.ckpt"), weights_only=True)
    assert "averaging_state" not in state
