"""End to end on small data in the real formats: every model config x every data config, train -> eval."""

import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from skuvision.errors import SkuvisionError
from skuvision.tasks.evaluate import evaluate
from skuvision.tasks.train import train
from tests.helpers import ROOT, compose_cfg, quick_overrides, refusal, run_cli
from tests.writers import write_image_folder

# timm.yaml holds the settings the others share; it names no model by itself.
MODELS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml") if p.stem != "timm")
DATA = sorted(p.stem for p in (ROOT / "conf" / "data").glob("*.yaml"))


def test_every_config_is_covered():
    assert {
        "resnet18",
        "resnet50",
        "vgg16",
        "inception_v3",
        "efficientnet_b0",
        "tf_efficientnet_lite0",
        "mobilenetv3_large_100",
        "convnext_tiny",
        "simple_cnn",
    } <= set(MODELS)
    assert {"fashion_mnist", "cifar10", "cifar100", "image_folder"} <= set(DATA)


# The file sources built on image folders (manifest, streaming) share the model code path with image_folder,
# and CIFAR-100 shares CIFAR-10's (3 channels at 32 px, only the class count differs): two models each keep
# the suite's time in bounds.
SAME_PATH_AS_ANOTHER = {"manifest", "streaming", "cifar100"}
CASES = [
    (model, data)
    for model in MODELS
    for data in DATA
    if data not in SAME_PATH_AS_ANOTHER or model in ("simple_cnn", "resnet18")
]


@pytest.mark.parametrize(("model", "data"), CASES)
def test_fast_dev_run(train_cfg, model, data):
    cfg = train_cfg(data, model, ["trainer.fast_dev_run=true"])
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    photos = data in ("image_folder", "manifest", "streaming")
    assert ("test/acc_top5" in metrics) == (not photos)  # 3 photo classes: no top-5
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert written["test/acc"] == pytest.approx(metrics["test/acc"])
    assert written["fit/time_s"] > 0 and written["test/time_s"] > 0  # make bench's clock excludes set-up


def test_checkpoint_reloads_to_the_same_test_metrics(train_cfg, tmp_path):
    steps = ["trainer.limit_train_batches=10"]  # how well it trained is not the question: the reload is
    cfg = train_cfg(
        "fashion_mnist", "simple_cnn", ["trainer.max_epochs=2", "trainer.deterministic=true", *steps]
    )
    metrics = train(cfg)
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    ckpt = written["checkpoint"]
    assert ckpt and ckpt.endswith(".ckpt")
    checkpoint = torch.load(ckpt, weights_only=True, map_location="cpu")  # plain values only
    assert checkpoint["hyper_parameters"]["class_names"][0] == "T-shirt/top"

    eval_cfg = compose_cfg(
        "eval", [f"ckpt_path={ckpt}", "trainer.accelerator=cpu", "threads=2"], tmp_path / "eval"
    )
    evaluated = evaluate(eval_cfg)
    for key in ("test/acc", "test/acc_top5", "test/f1_macro", "test/loss"):
        assert evaluated[key] == pytest.approx(written[key], abs=1e-6), key
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["test/acc"] == pytest.approx(
        metrics["test/acc"]
    )


def test_test_ckpt_names_the_checkpoint_that_is_tested(train_cfg):
    """Default last: the every-epoch checkpoint of the final epoch; best: the one the val/acc monitor kept."""
    short = ["trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.limit_test_batches=1"]
    cfg = train_cfg("fashion_mnist", "simple_cnn", ["trainer.max_epochs=3", *short])
    train(cfg)
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert Path(written["checkpoint"]).name == "last.ckpt"
    assert torch.load(written["checkpoint"], weights_only=True, map_location="cpu")["epoch"] == 2
    assert Path(written["best_checkpoint"]).name.startswith("best-epoch")

    cfg = train_cfg("fashion_mnist", "simple_cnn", ["trainer.max_epochs=3", "test_ckpt=best", *short])
    train(cfg)
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert written["checkpoint"] == written["best_checkpoint"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["test_ckpt=middle"], r"test_ckpt=middle: choose best"),
        (["~callbacks.last_checkpoint"], r"test_ckpt=last needs a checkpoint saved every epoch"),
    ],
)
def test_a_test_ckpt_the_run_cannot_give_is_refused_before_the_fit(train_cfg, overrides, message):
    cfg = train_cfg("fashion_mnist", "simple_cnn", ["trainer.max_epochs=1", *overrides])
    with pytest.raises(SkuvisionError, match=message):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_training_learns_the_pattern(train_cfg):
    """Two epochs on the synthetic set: accuracy far above chance, so the whole loop really trains (1.00
    for seeds 1-3, against 0.1 by chance and the 0.6 asked)."""
    short = ["trainer.max_epochs=2", "data.batch_size=16", "input.image_size=28", "optimizer.lr=0.01"]
    cfg = train_cfg("fashion_mnist", "simple_cnn", short)
    metrics = train(cfg)
    assert metrics["test/acc"] > 0.6
    # Training logs its loss and accuracy; the other metrics are val's and test's (cheaper steps).
    header = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    logged = {k for k in header if k.startswith("train/")}
    assert {"train/acc", "train/loss"} <= logged <= {"train/acc", "train/loss", "train/loss_step"}
    assert {"val/f1_macro", "val/acc_top5"} <= set(header)


# Warnings a train.py run may print, each by its exact text and explained in the README ("What a run
# prints"). None today: library messages known to be harmless are filtered where they are emitted
# (skuvision.compat.KNOWN_WARNINGS and its neighbours).
EXPLAINED_WARNINGS: tuple[str, ...] = ()


def unexplained_warnings(output: str) -> list[str]:
    """Lines that look like a warning or a tip: Python's `file.py:N: Category: ...` and Lightning's shorter
    `file.py:N: ...`, a log record at WARNING, any line naming a warning, a deprecation or a tip."""
    suspicious = re.compile(r"warn|deprecat|tip:|\.py:\d+: ", re.IGNORECASE)
    lines = output.replace("\r", "\n").splitlines()
    return [line for line in lines if suspicious.search(line) and line not in EXPLAINED_WARNINGS]


def test_train_cli_writes_one_run_folder_and_prints_no_unexplained_warning(data_root, tmp_path):
    """A whole small train.py run with the default callbacks (bar, model summary, EMA, checkpoints) and its
    test of the last checkpoint: one run folder, and no warning the README does not explain (issue 26)."""
    defaults = ("callbacks.progress_bar=null", "trainer.enable_model_summary=false")
    overrides = [o for o in quick_overrides("fashion_mnist", data_root) if o not in defaults]
    limits = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    result = run_cli("train.py", [*overrides, *limits, "trainer.limit_test_batches=1"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1
    assert (runs[0] / ".hydra" / "config.yaml").is_file()
    assert json.loads((runs[0] / "metrics.json").read_text())["test/acc"] >= 0
    assert "test/acc = " in result.stdout
    assert unexplained_warnings(result.stdout + result.stderr) == []
    # Not a terminal: no bar redrawn with carriage returns, one line per epoch instead.
    assert "\r" not in result.stdout + result.stderr
    assert [line.split("  ")[0] for line in result.stdout.splitlines() if line.startswith("epoch ")] == [
        "epoch 1/1"
    ]


def test_the_warning_check_sees_each_kind_of_warning_line():
    lines = [
        "/x/torch/utils/_pytree.py:21: FutureWarning: `isinstance(treespec, LeafSpec)` is deprecated",
        "/x/pytorch_lightning/loops/fit_loop.py:321: The number of training batches (4) is smaller",
        "[2026-12-06 16:26:06,684][skuvision][WARNING] - 2 unreadable image(s) skipped",
        "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
    ]
    fine = ["test/acc = 0.5813   run folder: /tmp/run", "epoch 1/2  val/acc 0.5  train/loss_step 1.2"]
    assert unexplained_warnings("\n".join(lines + fine)) == lines


def planted_last_ckpt(run: Path, form: str) -> Path:
    """A file planted as `run`'s checkpoints/last.ckpt that would write ran.txt beside `run` if unpickled:
    a zip torch.save wrote, or a bare pickle."""
    last = run / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    payload = {"state_dict": {}, "hyper_parameters": RunsCode(run.parent / "ran.txt"), "epoch": 0}
    if form == "torch.save":
        torch.save(payload, last)
    else:
        last.write_bytes(pickle.dumps(payload))
    return last


@pytest.fixture
def refused_train(capsys):
    """train.py's stderr for a mistake it must stop at in one line: its task run in this process through the
    commands' wrapper (helpers.refusal; test_train_cli_writes_one_run_folder_... runs train.py itself)."""

    def refused(overrides: list[str], run: Path) -> str:
        return refusal(train, "train", overrides, run, capsys)

    return refused


def test_missing_data_is_a_clear_one_line_error(refused_train, tmp_path):
    (tmp_path / "nothing").mkdir()
    overrides = quick_overrides("fashion_mnist", tmp_path) + [f"data.root={tmp_path / 'nothing'}"]
    stderr = refused_train([*overrides, "data.system_dirs=[]"], tmp_path / "run")
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error: Fashion-MNIST files not found: train-images-idx3-ubyte.gz")
    assert "make data" in lines[-1] and str(tmp_path / "nothing") in lines[-1]


def test_missing_cifar_names_the_files(refused_train, tmp_path):
    stderr = refused_train(quick_overrides("cifar10", tmp_path) + [f"data.root={tmp_path}"], tmp_path / "run")
    assert "error: CIFAR10 files not found" in stderr and "data_batch_1" in stderr


def test_unknown_model_name_is_a_clear_one_line_error(refused_train, data_root, tmp_path):
    overrides = [*quick_overrides("fashion_mnist", data_root), "model.name=resnet5000"]
    stderr = refused_train(overrides, tmp_path / "run")
    assert stderr.strip().splitlines()[-1].startswith("error: unknown model.name='resnet5000'")


def test_unknown_model_option_lists_the_choices(tmp_path):
    """Hydra's own answer, before any task: train.py run as a user runs it (it loads no torch for this)."""
    result = run_cli("train.py", ["model=resnet5000"], tmp_path)
    assert result.returncode == 1
    assert "Could not find 'model/resnet5000'" in result.stderr and "resnet50" in result.stderr


def test_pretrained_without_weights_fails_fast_naming_model_weights(refused_train, data_root, tmp_path):
    resnet18 = quick_overrides("fashion_mnist", data_root, "resnet18")
    stderr = refused_train([*resnet18, "model.pretrained=true"], tmp_path / "run")
    last = stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: model.pretrained=true but no weights for resnet18")
        and "model.weights" in last
    )


def test_an_empty_val_split_is_a_one_line_error(tmp_path, train_cfg):
    photos = write_image_folder(tmp_path / "photos", per_class=6)  # 0.8/0.1/0.1 of 6 leaves val empty
    cfg = train_cfg("image_folder", extra=[f"data.root={photos}"])
    with pytest.raises(SkuvisionError, match=r"the val split is empty .* watch val/acc: add images"):
        train(cfg)


class RunsCode:
    """A pickle payload: unpickling it would write `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.mark.parametrize("form", ["torch.save", "pickle"])
def test_a_planted_last_ckpt_runs_nothing_when_a_run_resumes(refused_train, data_root, tmp_path, form):
    """A run re-entering its folder (a requeued job) resumes from checkpoints/last.ckpt: a file planted there,
    as a zip torch.save wrote or as a bare pickle (planted_last_ckpt), is refused in one line before
    anything unpickles it (in this process: what would run, would run here and write ran.txt)."""
    last = planted_last_ckpt(tmp_path / "run", form)
    planted = last.read_bytes()
    overrides = [*quick_overrides("fashion_mnist", data_root), "trainer.max_epochs=1"]
    stderr = refused_train(overrides, tmp_path / "run")
    assert not (tmp_path / "ran.txt").exists()
    line = stderr.strip().splitlines()[-1]
    assert (
        line.startswith(f"error: {last} (this run folder's last checkpoint") and "is not a checkpoint" in line
    )
    assert line.endswith("To start this run afresh, move that file away")
    assert last.read_bytes() == planted and sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


def test_a_resumed_run_loads_its_checkpoint_weights_only(train_cfg, monkeypatch):
    """A rerun in the same folder reads last.ckpt through the checked reader, then Lightning loads it again:
    both loads use torch's weights-only unpickler, so a file swapped in between runs nothing either."""
    # a step schedule has no fixed length, so the rerun may go on for another epoch
    short = ["scheduler=step", "test=false", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    train(train_cfg("fashion_mnist", "simple_cnn", ["trainer.max_epochs=1", *short]))
    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    requeued = train_cfg("fashion_mnist", "simple_cnn", ["trainer.max_epochs=2", *short])
    train(requeued)
    monkeypatch.undo()
    last = Path(requeued.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 4  # resumed, not afresh
    assert len(loads) >= 2 and all(flag is True for flag in loads), loads


@pytest.mark.parametrize("scheduler", ["onecycle", "cosine"])
def test_resuming_with_a_longer_schedule_is_refused_before_fitting(train_cfg, tmp_path, scheduler):
    """A schedule's length is fixed when its run starts: one-cycle stepped past its end ("Tried to step 8
    times"), warmup-cosine would jump along its curve. Killed in its second epoch (3 steps an epoch) and
    requeued with a larger trainer.max_epochs, the run is refused, naming the key and the value it started
    with; requeued as it was, it resumes and finishes."""
    short = [
        f"scheduler={scheduler}",
        "test=false",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
    ]
    kill = ["+callbacks.kill._target_=tests.probes.KillAtStep", "+callbacks.kill.step=4"]
    kill.append(f"+callbacks.kill.path={tmp_path / 'killed.ckpt'}")
    first = train_cfg("fashion_mnist", "simple_cnn", ["trainer.max_epochs=2", *short, *kill])
    with pytest.raises(RuntimeError, match="killed after step 4"):
        train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 3

    longer = train_cfg("fashion_mnist", "simple_cnn", ["trainer.max_epochs=3", *short])
    message = (
        rf"^trainer\.max_epochs=3 makes the LR schedule 9 steps long, but {last} resumes a run "
        r"whose schedule was fixed at 6 steps when it started \(trainer\.max_epochs=2\): "
        r"resume with the trainer\.max_epochs it started with"
    )
    with pytest.raises(SkuvisionError, match=message):
        train(longer)
    assert last.read_bytes() == saved

    train(train_cfg("fashion_mnist", "simple_cnn", ["trainer.max_epochs=2", *short]))
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 6
