"""ckpt_path must be an intact checkpoint train.py wrote: anything else (another file, a corrupted one, one
whose weights do not fit its model) gets one line naming the file in every task; checkpoints of earlier
skuvision versions still load, to the same predictions."""

import shutil
import struct
import zipfile

import pytest
import torch

from skuvision.checkpoints import load_classifier, read_checkpoint
from skuvision.data.datasets import InputImageFiles
from skuvision.data.transforms import ToModelInput
from skuvision.errors import SkuvisionError
from skuvision.tasks.audit import audit
from skuvision.tasks.embed import embed
from skuvision.tasks.evaluate import evaluate
from skuvision.tasks.export import export
from skuvision.tasks.predict import predict
from skuvision.tasks.serve import prepared
from skuvision.tasks.train import train
from tests.helpers import compose_cfg, refusal, run_cli
from tests.writers import banded_portrait

SCRIPTS = {"eval.py": evaluate, "predict.py": predict, "train.py": train}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    from tests.helpers import quick_overrides

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


# The commands' answers below run the task in this process through the commands' own wrapper
# (helpers.refusal); test_cli_answers_a_misshapen_checkpoint_in_one_line runs eval.py as a user does.
@pytest.mark.parametrize("script", ["eval.py", "train.py"])
def test_cli_answers_a_text_file_in_one_line(not_checkpoints, tmp_path, script, data_root, capsys):
    path = not_checkpoints["text"]
    extra = (
        [f"data.root={data_root / 'fashion_mnist'}", "data.download=false"] if script == "train.py" else []
    )
    overrides = [f"ckpt_path={path}", "trainer.accelerator=cpu", *extra]
    stderr = refusal(SCRIPTS[script], script.removesuffix(".py"), overrides, tmp_path / "run", capsys)
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: ckpt_path={path} is not a checkpoint") and "train.py" in line


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


def test_a_checkpoint_from_before_crop_mode_predicts_a_portrait_photo_as_before(trained, tmp_path):
    """Its stored input config has no crop_mode: every path reads it as center, the only crop there was, and
    it predicts a portrait photo exactly as the same weights with crop_mode=center do, not as squash does."""
    checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    assert hparams["input_config"]["crop_mode"] == "center"
    hparams["input_config"] = {k: v for k, v in hparams["input_config"].items() if k != "crop_mode"}
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    photo = tmp_path / "portrait.jpg"
    banded_portrait(600, 800, band=60).save(photo, quality=95)

    def logits(module, input_config):
        image, error = InputImageFiles([photo], input_config)[0]
        assert error == ""
        with torch.inference_mode():
            return module(ToModelInput(input_config)(image.unsqueeze(0)))

    earlier, current = load_classifier(old).eval(), load_classifier(trained).eval()
    assert "crop_mode" not in earlier.input_config
    assert torch.equal(logits(earlier, earlier.input_config), logits(current, current.input_config))
    squashed = {**current.input_config, "crop_mode": "squash"}
    assert not torch.equal(logits(earlier, earlier.input_config), logits(current, squashed))


def zero_stored_bytes(path):
    """Overwrites every tensor storage inside the zip with zeros, in place: the archive stays valid (same
    sizes, same headers), only the CRC-32 its central directory records no longer matches, as after bit rot or
    a truncated copy padded with zeros."""
    with zipfile.ZipFile(path) as archive:
        storages = [m for m in archive.infolist() if "/data/" in m.filename and m.file_size]
    with open(path, "r+b") as f:
        for member in storages:
            f.seek(member.header_offset + 26)  # the local header's name and extra-field lengths
            name_length, extra_length = struct.unpack("<HH", f.read(4))
            f.seek(member.header_offset + 30 + name_length + extra_length)
            f.write(bytes(member.file_size))


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, trained):
    """A CRC-corrupted copy of a real checkpoint, and an intact one with a wrongly shaped tensor."""
    folder = tmp_path_factory.mktemp("damaged")
    corrupted = folder / "corrupted.ckpt"
    shutil.copy(trained, corrupted)
    zero_stored_bytes(corrupted)
    checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
    head = next(k for k, v in reversed(checkpoint["state_dict"].items()) if v.ndim == 2)
    checkpoint["state_dict"][head] = checkpoint["state_dict"][head][:-1].clone()
    misshapen = folder / "misshapen.ckpt"
    torch.save(checkpoint, misshapen)
    return {"corrupted": corrupted, "misshapen": misshapen, "head": head}


def test_torch_load_alone_takes_the_corrupted_file_for_zeros(damaged, trained):
    """Why the reader checks CRCs: torch.load does not, and hands back the zeroed weights as if trained."""
    original = torch.load(trained, map_location="cpu", weights_only=True)["state_dict"]
    loaded = torch.load(damaged["corrupted"], map_location="cpu", weights_only=True)["state_dict"]
    assert loaded.keys() == original.keys()
    assert all(not t.any() for t in loaded.values()) and any(t.any() for t in original.values())


def test_a_corrupted_checkpoint_is_refused_naming_the_file(damaged):
    path = damaged["corrupted"]
    with pytest.raises(
        SkuvisionError, match=rf"^ckpt_path={path} is corrupted: \S+/data/\d+ inside it fails"
    ) as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("script", ["eval.py", "predict.py", "train.py"])
def test_cli_refuses_a_corrupted_checkpoint_in_one_line(damaged, tmp_path, script, data_root, capsys):
    path = damaged["corrupted"]
    extra = {
        "predict.py": [f"input={data_root / 'photos'}"],
        "train.py": [f"data.root={data_root / 'fashion_mnist'}", "data.download=false"],
    }.get(script, [])
    overrides = [f"ckpt_path={path}", "trainer.accelerator=cpu", *extra]
    stderr = refusal(SCRIPTS[script], script.removesuffix(".py"), overrides, tmp_path / "run", capsys)
    assert stderr.strip().splitlines()[-1].startswith(f"error: ckpt_path={path} is corrupted: ")
    assert not list(tmp_path.rglob("*.csv")) and not list(tmp_path.rglob("checkpoints"))


def test_a_corrupted_last_ckpt_is_refused_when_a_run_resumes(damaged, tmp_path, data_root):
    """A requeued run resumes from its folder's last.ckpt: the same reader checks it first."""
    from tests.helpers import quick_overrides

    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    shutil.copy(damaged["corrupted"], last)
    cfg = compose_cfg(
        "train", quick_overrides("fashion_mnist", data_root) + ["trainer.max_epochs=2"], tmp_path / "run"
    )
    with pytest.raises(
        SkuvisionError,
        match=rf"^{last} \(this run folder's last checkpoint.*\) is corrupted: .*move that file away$",
    ):
        train(cfg)
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


TASKS = {
    "eval": evaluate,
    "predict": predict,
    "embed": embed,
    "export": export,
    "audit": audit,
    "serve": prepared,
}


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("corrupted", r" is corrupted: \S+ inside it fails its CRC check"),
        (
            "misshapen",
            r": its weights do not fit the model .*\(HEAD is \[\d+, \d+\] in the file",
        ),
    ],
)
def test_every_checkpoint_task_refuses_a_damaged_checkpoint_in_one_line(
    damaged, tmp_path, task, kind, expected
):
    path = damaged[kind]
    overrides = [f"ckpt_path={path}"] + {"predict": ["input=x.jpg"], "serve": []}.get(
        task, ["trainer.accelerator=cpu"]
    )
    cfg = compose_cfg(task, overrides, tmp_path / "run")
    pattern = rf"^ckpt_path={path}" + expected.replace("HEAD", damaged["head"].replace(".", r"\."))
    with pytest.raises(SkuvisionError, match=pattern) as err:
        TASKS[task](cfg)
    assert "\n" not in str(err.value)


def test_cli_answers_a_misshapen_checkpoint_in_one_line(damaged, tmp_path):
    path = damaged["misshapen"]
    result = run_cli("eval.py", [f"ckpt_path={path}", "trainer.accelerator=cpu"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: ckpt_path={path}: its weights do not fit") and damaged["head"] in last
    assert "Traceback" not in result.stderr


class RunsCode:
    """A pickle payload: unpickling it would write `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_a_checkpoint_that_would_run_code_is_refused_naming_what_it_holds(tmp_path):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "planted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": RunsCode(marker)}, path)
    with pytest.raises(
        SkuvisionError, match=rf"^ckpt_path={path} is not a checkpoint \(.*GLOBAL .*exec"
    ) as err:
        read_checkpoint(path)
    assert not marker.exists()
    assert "weights_only=False" not in str(err.value) and "\x1b" not in str(err.value)  # torch's own advice
