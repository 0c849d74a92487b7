"""The input config is resolved once, from the model's name, without building it; `input.*` overrides win;
the DataModule and the Classifier are built with the same one, and nothing rewrites it afterwards."""

import pytest
import timm

from skuvision.assembly import build
from skuvision.data.datamodule import ImageDataModule
from skuvision.data.transforms import crop_mode
from skuvision.errors import SkuvisionError
from skuvision.models.input_config import resolve_input
from skuvision.tasks.train import train
from tests.helpers import compose_cfg, quick_overrides, refusal, run_cli


def built(tmp_path, data_root, model, extra=()):
    overrides = quick_overrides("image_folder", data_root, model) + ["input.image_size=null", *extra]
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    return build(cfg)


@pytest.mark.parametrize(("model", "size"), [("inception_v3", 299), ("resnet50", 224), ("simple_cnn", 28)])
def test_image_size_comes_from_the_model(tmp_path, data_root, model, size):
    datamodule, module = built(tmp_path, data_root, model)
    assert module.input_config["input_size"] == [3, size, size]
    assert datamodule.input_config == module.input_config == module.hparams.input_config
    assert datamodule.to_model_input.image_size == size


def test_resolving_the_input_builds_no_model(monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("resolve_input built a model")

    monkeypatch.setattr(timm, "create_model", no_model)
    config = resolve_input({"name": "tf_efficientnet_lite0"}, in_chans=1)
    assert config == {
        "input_size": [1, 224, 224],
        "mean": [0.5],
        "std": [0.5],
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "crop_mode": "center",
    }


def test_gray_input_averages_the_rgb_statistics():
    config = resolve_input({"name": "resnet18"}, in_chans=1)
    assert config["mean"] == pytest.approx([(0.485 + 0.456 + 0.406) / 3])
    assert config["std"] == pytest.approx([(0.229 + 0.224 + 0.225) / 3])


def test_unknown_model_name_is_one_line():
    with pytest.raises(
        SkuvisionError, match=r"^unknown model\.name='resnet5000': not a timm model\. Similar"
    ):
        resolve_input({"name": "resnet5000"}, in_chans=3)


def test_overrides_win(tmp_path, data_root):
    datamodule, module = built(
        tmp_path,
        data_root,
        "resnet18",
        [
            "input.image_size=64",
            "input.interpolation=bilinear",
            "input.mean=[0.1,0.2,0.3]",
            "input.std=[1,1,1]",
        ],
    )
    assert module.input_config["input_size"] == [3, 64, 64]
    assert module.input_config["interpolation"] == "bilinear"
    assert module.input_config["mean"] == [0.1, 0.2, 0.3]
    assert datamodule.input_config == module.input_config


def test_the_data_module_has_no_input_setter():
    assert not [name for name in dir(ImageDataModule) if name.startswith("set_")]


def test_inception_batches_arrive_at_299(tmp_path, data_root):
    datamodule, _ = built(tmp_path, data_root, "inception_v3")
    datamodule.setup("fit")
    images, labels = datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
    assert images.shape[1:] == (3, 299, 299)
    assert images.dtype.is_floating_point


def test_a_renamed_key_names_its_new_name(tmp_path):
    result = run_cli("train.py", ["data.image_size=64"], tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip() == "error: data.image_size is now input.image_size: write input.image_size=64"
    )


def test_crop_mode_comes_from_timm_and_the_override_wins(tmp_path, data_root):
    assert resolve_input({"name": "resnet18"}, in_chans=3)["crop_mode"] == "center"
    # timm's pretrained config of this tag squashes (no crop at crop_pct 1.0)
    assert resolve_input({"name": "convnext_tiny.in12k_ft_in1k_384"}, in_chans=3)["crop_mode"] == "squash"
    datamodule, module = built(tmp_path, data_root, "resnet18", ["input.crop_mode=border"])
    assert module.input_config["crop_mode"] == "border" == datamodule.to_model_input.crop_mode
    assert datamodule.input_config == module.input_config


def test_an_unknown_crop_mode_is_one_line(tmp_path, capsys):
    with pytest.raises(SkuvisionError, match=r"^input\.crop_mode='fit': use one of center, squash, border$"):
        resolve_input({"name": "resnet18"}, in_chans=3, crop_mode="fit")
    with pytest.raises(SkuvisionError, match=r"^input\.crop_mode='crop': use one of"):
        crop_mode({"crop_mode": "crop"})  # a stored config someone edited
    # train.py's answer, its task run in this process through the commands' wrapper
    overrides = ["model=simple_cnn", "input.crop_mode=fit"]
    stderr = refusal(train, "train", overrides, tmp_path / "run", capsys)
    line = stderr.strip().splitlines()[-1]
    assert line == "error: input.crop_mode='fit': use one of center, squash, border"


def test_an_input_config_stored_without_crop_mode_is_center():
    """Checkpoints, shards and model.json files written before crop_mode existed all cropped the center."""
    stored = resolve_input({"name": "resnet18"}, in_chans=3)
    stored.pop("crop_mode")
    assert crop_mode(stored) == "center"
