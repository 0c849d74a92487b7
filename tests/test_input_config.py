"""The model decides the input; the user's data.* overrides win."""

import pytest
from conftest import compose_cfg, quick_overrides

from skuvision.tasks.train import build


def built(tmp_path, data_root, model, extra=()):
    overrides = quick_overrides("image_folder", data_root, model) + ["data.image_size=null", *extra]
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    return build(cfg)


@pytest.mark.parametrize(("model", "size"), [("inception_v3", 299), ("resnet50", 224), ("simple_cnn", 28)])
def test_image_size_comes_from_the_model(tmp_path, data_root, model, size):
    datamodule, module = built(tmp_path, data_root, model)
    assert module.input_config["input_size"] == [3, size, size]
    assert datamodule.input_config == module.input_config


def test_overrides_win(tmp_path, data_root):
    _, module = built(
        tmp_path,
        data_root,
        "resnet18",
        ["data.image_size=64", "data.interpolation=bilinear", "data.mean=[0.1,0.2,0.3]", "data.std=[1,1,1]"],
    )
    assert module.input_config["input_size"] == [3, 64, 64]
    assert module.input_config["interpolation"] == "bilinear"
    assert module.input_config["mean"] == [0.1, 0.2, 0.3]


def test_inception_batches_arrive_at_299(tmp_path, data_root):
    datamodule, _ = built(tmp_path, data_root, "inception_v3")
    datamodule.setup("fit")
    images, labels = datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
    assert images.shape[1:] == (3, 299, 299)
    assert images.dtype.is_floating_point
