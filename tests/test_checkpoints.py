"""ckpt_path must be a checkpoint train.py wrote: anything else gets one line naming the file; checkpoints of
earlier skuvision versions still load, to the same predictions."""

import zipfile

import pytest
import torch
from conftest import compose_cfg, run_cli

from skuvision.checkpoints import load_classifier, read_checkpoint
from skuvision.errors import SkuvisionError
from skuvision.tasks import train
from skuvision.tasks.embed import embed
from skuvision.tasks.export import export
from skuvision.tasks.predict import predict


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    from conftest import quick_overrides

    run = tmp_path_factory.mktemp("train") / "run"
    overrides = quick_overrides("fashion_mnist", data_root) + ["trainer.max_epochs=1", "test=false"]
    train(compose_cfg("train", overrides, run))
    return next((run / "checkpoints").glob("best-*.ckpt"))


@pytest.fixture(scope="module")
def not_checkpoints(tmp_path_factory, trained):
    folder = tmp_path_factory.mktemp("bad")
    text = folder / "notes.ckpt"
    text.write_text("this is a text file, not a checkpoint\n")
    weights = folder / "weights.pth"
    torch.save(load_classifier(trained).backbone.state_dict(), weights)
    archive = folder / "photos.ckpt"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("photo.jpg", b"not a tensor")
    return {"text": text, "weights": weights, "archive": archive}


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("text", "is not a checkpoint"), ("archive", "is not a checkpoint"), ("weights", "bare state dict")],
)
def test_read_checkpoint_names_the_file(not_checkpoints, kind, expected):
    path = not_checkpoints[kind]
    with pytest.raises(SkuvisionError, match=rf"^ckpt_path={path} .*{expected}") as raised:
        read_checkpoint(path)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("script", ["eval.py", "train.py"])
def test_cli_answers_a_text_file_in_one_line(not_checkpoints, tmp_path, script, data_root):
    path = not_checkpoints["text"]
    extra = (
        [f"data.root={data_root / 'fashion_mnist'}", "data.download=false"] if script == "train.py" else []
    )
    result = run_cli(script, [f"ckpt_path={path}", "trainer.accelerator=cpu", *extra], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: ckpt_path={path} is not a checkpoint") and "train.py" in lines[-1]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("task", [predict, embed, export])
def test_every_checkpoint_task_refuses_a_weights_file(not_checkpoints, tmp_path, task):
    name = task.__name__
    path = not_checkpoints["weights"]
    overrides = [f"ckpt_path={path}", "trainer.accelerator=cpu"] + (
        ["input=x.jpg"] if name == "predict" else []
    )
    cfg = compose_cfg(name, overrides, tmp_path / "run")
    with pytest.raises(SkuvisionError, match=rf"^ckpt_path={path} is a bare state dict .*model\.weights"):
        task(cfg)


def test_a_checkpoint_of_an_earlier_version_loads_to_the_same_predictions(trained, tmp_path):
    """Earlier checkpoints kept the user's input overrides (in the data config too) instead of the
    resolved input config, and a model config without `_target_`."""
    checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    image_size = hparams["input_config"]["input_size"][-1]
    hparams.pop("input_config")
    hparams["model"].pop("_target_")
    hparams["input_overrides"] = {"image_size": image_size, "mean": None, "std": None}
    hparams["data"] = {**hparams["data"], "image_size": image_size, "mean": None, "crop_pct": None}
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)

    current, earlier = load_classifier(trained).eval(), load_classifier(old).eval()
    assert earlier.input_config == current.input_config
    assert "image_size" not in earlier.hparams.data
    images = torch.randn(4, *current.input_config["input_size"])
    torch.testing.assert_close(earlier(images), current(images), rtol=0, atol=0)
