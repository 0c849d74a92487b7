"""Scale-out on a CPU: DDP over 2 gloo processes, bf16, multiruns, the SLURM launcher without a cluster."""

import csv
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from skuvision.assembly import build
from skuvision.checkpoints import load_classifier
from skuvision.data import FashionMNISTDataModule
from skuvision.errors import SkuvisionError
from skuvision.finetune import Full, Gradual
from skuvision.models import create_backbone
from skuvision.tasks.evaluate import evaluate
from skuvision.tasks.launch import check_devices, ddp_strategy, resume_path
from skuvision.tasks.train import train
from skuvision.tasks.utils import unwrapped
from tests.helpers import ROOT, compose_cfg, quick_overrides, run_cli


def only_run_folder(parent: Path) -> Path:
    runs = [p for p in parent.glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp"])
def test_two_process_ddp_run_matches_a_single_process_eval(data_root, tmp_path, strategy):
    """ddp re-runs the command for rank 1 (same run folder, its info lines dropped); ddp_spawn spawns it."""
    overrides = quick_overrides("fashion_mnist", data_root) + [
        "trainer=ddp_cpu",
        f"trainer.strategy={strategy}",
        "trainer.max_epochs=1",
        "trainer.deterministic=true",
        "trainer.precision=32",  # as the eval below: this CPU would pick bf16 by itself
        "data.subset=0.99",  # 99 test images: a distributed test would pad them with a repeated one
        "threads=1",
    ]
    result = run_cli("train.py", overrides, tmp_path, {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run_folder(tmp_path / "outputs")
    assert [p.name for p in run.glob("*.log")] == ["train.log"]
    assert [p.relative_to(run).as_posix() for p in run.rglob("metrics.csv")] == ["csv/metrics.csv"]
    assert result.stdout.count("test/acc = ") == 1
    if strategy == "ddp":  # rank 1 ran train() too, and wrote no info line of its own
        assert (run / "train.log").read_text().count("] - input: ") == 1

    # data.batch_size=8 is the global batch: each of the 2 processes steps through its half 4 images a step.
    train_images = sum(json.loads((run / "class_counts.json").read_text())["train"].values())
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == math.ceil(train_images / 2 / 4)

    written = json.loads((run / "metrics.json").read_text())
    assert written["checkpoint"] == str(run / "checkpoints" / "last.ckpt")  # ddp_spawn too: test_ckpt=last
    eval_cfg = compose_cfg(
        "eval",
        [
            f"ckpt_path={written['checkpoint']}",
            "trainer.accelerator=cpu",
            "trainer.precision=32",
            "threads=2",
        ],
        tmp_path / "eval",
    )
    evaluated = evaluate(eval_cfg)
    for key in ("test/acc", "test/acc_top5", "test/f1_macro", "test/loss"):
        assert evaluated[key] == pytest.approx(written[key], abs=1e-6), key


def test_batch_size_is_global_and_must_divide_among_processes(data_root):
    root = data_root / "fashion_mnist"
    input_config = {
        "input_size": [1, 28, 28],
        "mean": [0.5],
        "std": [0.5],
        "interpolation": "bilinear",
        "crop_pct": 1,
    }
    datamodule = FashionMNISTDataModule(
        root=str(root), input_config=input_config, system_dirs=[], download=False, batch_size=8
    )
    assert datamodule.per_process_batch_size() == 8  # no Trainer: one process
    assert datamodule.per_process_batch_size(2) == 4
    with pytest.raises(SkuvisionError, match=r"^data\.batch_size=8 .* 3 processes .*multiple of 3$"):
        datamodule.per_process_batch_size(3)


def test_bf16_mixed_fast_dev_run_on_cpu(train_cfg):
    cfg = train_cfg(
        "fashion_mnist", "simple_cnn", ["trainer.precision=bf16-mixed", "trainer.fast_dev_run=true"]
    )
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert math.isfinite(metrics["test/loss"])


@pytest.mark.slow
def test_multirun_of_two_ddp_cpu_jobs_makes_two_run_folders(data_root, tmp_path):
    overrides = quick_overrides("fashion_mnist", data_root) + [
        "trainer=ddp_cpu",
        "trainer.fast_dev_run=true",
        "threads=1",
        "seed=1,2",
    ]
    result = run_cli("train.py", ["-m", *overrides], tmp_path, {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = only_run_folder(tmp_path / "multirun")
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert json.loads((sweep / job / "metrics.json").read_text())["test/acc"] >= 0
    assert not (tmp_path / "outputs").exists()  # no process fell back to a run folder of its own


def test_ddp_inside_a_multirun_is_a_one_line_error(data_root, tmp_path):
    overrides = quick_overrides("fashion_mnist", data_root) + [
        "trainer=ddp_cpu",
        "trainer.strategy=ddp",
        "trainer.fast_dev_run=true",
        "seed=1,2",
    ]
    result = run_cli("train.py", ["-m", *overrides], tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: trainer.strategy=ddp cannot run inside a multirun") and "ddp_spawn" in last
    assert "Traceback" not in result.stderr


def test_gpu_configs_without_enough_gpus_fail_in_one_line(monkeypatch):
    ddp = OmegaConf.create({"accelerator": "gpu", "devices": 8})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(
        SkuvisionError, match=r"^trainer\.accelerator=gpu but no GPU is visible: use trainer=cpu"
    ):
        check_devices(ddp)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(
        SkuvisionError, match=r"^trainer\.devices=8 but 2 GPU\(s\) are visible: use trainer\.devices=2$"
    ):
        check_devices(ddp)
    check_devices(OmegaConf.create({"accelerator": "gpu", "devices": 2, "sync_batchnorm": True}))
    check_devices(OmegaConf.create({"accelerator": "cpu", "devices": 2}))
    with pytest.raises(SkuvisionError, match=r"^trainer\.sync_batchnorm=true needs GPUs"):
        check_devices(OmegaConf.create({"accelerator": "cpu", "devices": 2, "sync_batchnorm": True}))


def test_a_rerun_in_the_same_folder_resumes_from_last_ckpt(train_cfg):
    """What a requeued SLURM job does: same run folder, so it continues from checkpoints/last.ckpt.
    (No LR schedule: OneCycle's length would change with max_epochs between the two runs.)"""
    short = ["test=false", "scheduler=none", "trainer.limit_train_batches=5", "trainer.limit_val_batches=2"]
    first = train_cfg("fashion_mnist", "simple_cnn", ["trainer.max_epochs=1", *short])
    assert resume_path(first) is None
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    steps_per_epoch = torch.load(last, weights_only=True, map_location="cpu")["global_step"]

    requeued = train_cfg("fashion_mnist", "simple_cnn", ["trainer.max_epochs=2", *short])
    assert resume_path(requeued) == str(last)
    train(requeued)
    resumed = torch.load(last, weights_only=True, map_location="cpu")
    assert (resumed["epoch"], resumed["global_step"]) == (1, 2 * steps_per_epoch)
    with open(Path(first.paths.output_dir) / "csv" / "metrics.csv") as f:
        epochs_validated = [row["epoch"] for row in csv.DictReader(f) if row["val/acc"]]
    assert epochs_validated == ["0", "1"]  # the first attempt's rows are kept
    assert resume_path(train_cfg(extra=[f"ckpt_path={last}"])) == str(last)
    # a run folder, or its checkpoints/, resumes from where the run stopped, not from its best checkpoint
    assert resume_path(train_cfg(extra=[f"ckpt_path={first.paths.output_dir}"])) == str(last)
    assert resume_path(train_cfg(extra=[f"ckpt_path={last.parent}"])) == str(last)
    last.rename(last.with_name("stopped.ckpt"))
    refused = r"no last\.ckpt in .*checkpoints, which a resume continues from\. Checkpoints in .*: best-.*st"
    with pytest.raises(SkuvisionError, match=refused):
        resume_path(train_cfg(extra=[f"ckpt_path={first.paths.output_dir}"]))
    with pytest.raises(SkuvisionError, match=r"^ckpt_path=/elsewhere/x\.ckpt: no such checkpoint file$"):
        resume_path(train_cfg(extra=["ckpt_path=/elsewhere/x.ckpt"]))


SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=multinode"]


def test_slurm_launcher_follows_the_trainer(tmp_path):
    cfg = compose_cfg("train", [*SLURM, "trainer.num_nodes=4", "trainer.devices=8"], tmp_path)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu"
    assert launcher.gpus_per_node == launcher.tasks_per_node == cfg.trainer.devices == 8
    assert launcher.nodes == cfg.trainer.num_nodes == 4
    assert launcher.timeout_min == 1440 and launcher.max_num_timeout > 0
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.strategy == "ddp"


def test_cfg_all_shows_the_slurm_settings(tmp_path):
    """`--cfg all`: the job config and Hydra's, launcher included, printed without submitting anything."""
    result = run_cli("train.py", [*SLURM, "trainer.num_nodes=2", "--cfg", "all"], tmp_path)
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert (printed.trainer.devices, printed.trainer.num_nodes, printed.trainer.strategy) == (8, 2, "ddp")
    launcher = printed.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)


def test_a_slurm_sweep_submits_one_array_job_with_the_trainers_nodes_and_gpus(tmp_path):
    """The real launcher and submitit, up to sbatch: a stand-in sbatch keeps the script and refuses it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(
        '#!/bin/sh\ncp "$1" "$SBATCH_SCRIPT"\necho "sbatch: no cluster" >&2\nexit 1\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "job.sh"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SBATCH_SCRIPT": str(script)}
    overrides = ["-m", *SLURM, "trainer.num_nodes=4", "model=resnet50", "optimizer.lr=1e-3,3e-4"]
    result = run_cli("train.py", overrides, tmp_path, env)
    assert result.returncode == 1 and "sbatch: no cluster" in result.stderr
    sbatch = {
        line.split("=")[0]: line.split("=", 1)[1]
        for line in script.read_text().splitlines()
        if "=" in line and line.startswith("#SBATCH")
    }
    assert sbatch["#SBATCH --array"] == "0-1%2"  # one job per sweep point
    assert sbatch["#SBATCH --nodes"] == "4"
    assert sbatch["#SBATCH --ntasks-per-node"] == sbatch["#SBATCH --gpus-per-node"] == "8"
    assert sbatch["#SBATCH --partition"] == "gpu"
    assert sbatch["#SBATCH --time"] == "1440"
    assert sbatch["#SBATCH --signal"] == "USR2@120"  # submitit's requeue signal, 2 minutes before the limit


@pytest.mark.slow
def test_tasks_started_by_slurm_share_one_run_folder(data_root, tmp_path):
    """What srun does on a node of a SLURM job: 2 tasks with SLURM's variables, started together, run folder
    given (submitit gives every task the job's). Lightning's SLURM environment makes them ranks 0 and 1."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    slurm = {
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "train",
        "SLURM_NODELIST": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    run = tmp_path / "run"
    overrides = quick_overrides("fashion_mnist", data_root) + [
        "trainer=ddp_cpu",
        "trainer.strategy=ddp",
        "trainer.fast_dev_run=true",
        "threads=1",
        f"hydra.run.dir={run}",
    ]
    command = [sys.executable, str(ROOT / "train.py"), *overrides]
    tasks = [
        subprocess.Popen(
            command,
            cwd=tmp_path,
            env={**os.environ, **slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    (out0, err0), (out1, _) = (task.communicate(timeout=300) for task in tasks)
    assert [task.returncode for task in tasks] == [0, 0], err0[-3000:]
    assert "SLURM auto-requeueing enabled" in err0  # Lightning took the SLURM environment
    assert "test/acc = " in out0 and "test/acc = " not in out1
    assert json.loads((run / "metrics.json").read_text())["test/acc"] >= 0
    assert [p.name for p in run.glob("*.log")] == ["train.log"]
    assert (run / "train.log").read_text().count("] - input: ") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.slow
def test_submitit_local_launcher_runs_one_job_end_to_end(data_root, tmp_path):
    overrides = quick_overrides("fashion_mnist", data_root) + [
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        "trainer.fast_dev_run=true",
    ]
    result = run_cli("train.py", ["-m", *overrides], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = only_run_folder(tmp_path / "multirun")
    assert json.loads((sweep / "0" / "metrics.json").read_text())["test/acc"] >= 0
    assert (sweep / ".submitit").is_dir()


def test_model_compile_compiles_the_backbone_in_place(train_cfg):
    """Checkpoint keys stay those of the plain backbone, so a checkpoint loads with or without compile.
    (Compiling itself is left to a GPU check: on this CPU the first step takes minutes.)"""
    _, plain_module = build(train_cfg(extra=["model.compile=false"]))
    _, compiled_module = build(train_cfg(extra=["model.compile=true"]))
    assert compiled_module.backbone._compiled_call_impl is not None
    assert plain_module.backbone._compiled_call_impl is None
    assert compiled_module.state_dict().keys() == plain_module.state_dict().keys()


def test_model_compile_without_a_cpp_compiler_is_refused_before_anything_runs(train_cfg, monkeypatch):
    monkeypatch.setattr("skuvision.models.backbone.inductor_cpp_compiler", lambda: None)
    with pytest.raises(Exception) as raised:  # noqa: PT011 (Hydra wraps it; the CLI shows the cause alone)
        build(train_cfg(extra=["model.compile=true"]))
    error = unwrapped(raised.value)
    assert isinstance(error, SkuvisionError)
    assert re.fullmatch(r"model.compile=true needs a C\+\+ compiler .* model.compile=false", str(error))


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("SKUVISION_TEST_COMPILE"),
    reason="builds real inductor kernels: 290 s on 2 shared CPU cores, over the suite's budget; "
    "SKUVISION_TEST_COMPILE=1 runs it",
)
def test_a_run_trained_compiled_gives_a_plain_checkpoint_that_predicts_the_same(train_cfg, tmp_path):
    """A fit with model.compile=true on the CPU: the checkpoint has the plain backbone's keys, tasks load it
    uncompiled, and it predicts what the compiled model does."""
    overrides = [
        "model.compile=true",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "test=false",
    ]
    cfg = train_cfg(extra=overrides)
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]
    _, plain = build(train_cfg(extra=["model.compile=false"]))
    assert state.keys() == plain.state_dict().keys()
    loaded = load_classifier(ckpt)
    assert loaded.backbone._compiled_call_impl is None  # eval, predict, embed, export: the plain module
    _, compiled = build(cfg)
    compiled.load_state_dict(state)
    images = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), compiled.eval()(images), rtol=1e-4, atol=1e-4)


def test_lr_finder_with_several_processes_is_a_one_line_error(train_cfg):
    cfg = train_cfg(extra=["trainer=ddp_cpu", "lr_find.enabled=true"])
    with pytest.raises(SkuvisionError, match=r"^lr_find\.enabled=true runs on one device: .*trainer=gpu"):
        train(cfg)


def test_several_nodes_without_a_cluster_is_a_one_line_error(train_cfg, monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    cfg = train_cfg(extra=["trainer=ddp_cpu", "trainer.num_nodes=2", "trainer.fast_dev_run=true"])
    with pytest.raises(
        SkuvisionError, match=r"^trainer\.num_nodes=2 needs its nodes started together: .*slurm"
    ):
        train(cfg)


def test_ddp_finds_unused_parameters_only_when_stages_freeze():
    backbone = create_backbone("simple_cnn", num_classes=3, in_chans=1)
    trainer = OmegaConf.create({"strategy": "ddp_spawn", "max_epochs": 3})
    assert ddp_strategy(trainer, Full(), backbone) == "ddp_spawn"
    assert (
        ddp_strategy(trainer, Gradual(unfreeze_at=[1]), backbone) == "ddp_spawn_find_unused_parameters_true"
    )
    assert ddp_strategy(OmegaConf.create({"strategy": "auto"}), Gradual(), backbone) == "auto"
