"""Sweeps: backbone comparison multiruns and their leaderboard, failed jobs as failed rows, a resumable
Optuna search, and one W&B run per job."""

import csv
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
from PIL import Image

from skuvision.tasks.compare import compare
from tests.helpers import ROOT, compose_cfg, quick_overrides, run_cli


def sweep_overrides(data_root: Path, sweep_dir: Path) -> list[str]:
    """The conftest's CPU-cheap overrides, without its model choice (the sweep sets it)."""
    cheap = [o for o in quick_overrides("fashion_mnist", data_root) if not o.startswith("model=")]
    return cheap + [f"hydra.sweep.dir={sweep_dir}"]


def leaderboard_rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "leaderboard.csv") as f:
        return list(csv.DictReader(f))


def test_compare_backbones_experiment_sweeps_the_four_backbones_with_one_recipe(tmp_path):
    cfg = compose_cfg("train", ["experiment=compare_backbones"], tmp_path)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params.model.split(",") == [
        "vgg16",
        "resnet50",
        "inception_v3",
        "efficientnet_b0",
    ]
    assert cfg.finetune._target_ == "skuvision.finetune.Gradual"
    assert list(cfg.finetune.unfreeze_at) == [1]
    assert cfg.hydra.callbacks.leaderboard._target_ == "skuvision.sweeps.LeaderboardCallback"


@pytest.mark.slow
def test_backbone_sweep_writes_a_leaderboard_with_the_failed_job_as_a_failed_row(tmp_path, data_root, capsys):
    sweep_dir = tmp_path / "sweep"
    overrides = sweep_overrides(data_root, sweep_dir) + [
        "experiment=compare_backbones",
        # inception_v3 cannot run on 32 px images: its stem shrinks them below its kernels
        "model=simple_cnn,resnet18,inception_v3",
        "trainer.fast_dev_run=true",
    ]
    result = run_cli("train.py", ["-m", *overrides], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2"]

    rows = leaderboard_rows(sweep_dir)
    assert [(r["backbone"], r["status"]) for r in rows][-1] == ("inception_v3", "failed")
    assert {r["backbone"] for r in rows[:2]} == {"simple_cnn", "resnet18"}
    for row in rows[:2]:
        assert row["status"] == "completed" and row["finetune"] == "gradual"
        assert 0 <= float(row["test acc %"]) <= 100 and float(row["img/s"]) > 0
        assert float(row["params (M)"]) > 0 and row["augment"] == "basic" and row["input px"] == "32"
        assert row["pretrained"] == "False"
    assert "Kernel size" in rows[2]["error"]
    assert "Kernel size" in json.loads((sweep_dir / "2" / "failed.json").read_text())["traceback"]
    assert "job 2 failed: RuntimeError" in result.stdout + result.stderr

    table = (sweep_dir / "leaderboard.md").read_text()
    assert table.count("| completed |") == 2 and table.count("| failed |") == 1
    with Image.open(sweep_dir / "leaderboard.png") as png:
        assert png.format == "PNG" and png.width > 300

    # compare.py's task writes the same leaderboard again from the run folders alone (in this process:
    # test_compare_on_a_folder_without_jobs_is_a_one_line_error runs compare.py itself).
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.png"):
        (sweep_dir / name).unlink()
    capsys.readouterr()
    compare(compose_cfg("compare", [f"sweep_dir={sweep_dir}"], tmp_path / "compare"))
    assert leaderboard_rows(sweep_dir) == rows
    assert (sweep_dir / "leaderboard.png").is_file()
    assert "2 of 3 jobs completed" in capsys.readouterr().out


def test_compare_on_a_folder_without_jobs_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with ThreadPoolExecutor(2) as pool:  # both at once: each is mostly an interpreter starting
        missing = pool.submit(run_cli, "compare.py", [f"sweep_dir={tmp_path / 'nothing'}"], tmp_path)
        empty = pool.submit(run_cli, "compare.py", [f"sweep_dir={tmp_path / 'empty'}"], tmp_path)
        result, empty = missing.result(), empty.result()
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: sweep_dir=")
    assert "Traceback" not in result.stderr
    assert empty.returncode == 2 and "holds no job folders" in empty.stderr


def optuna_command(data_root: Path, sweep_dir: Path, *extra: str) -> list[str]:
    return sweep_overrides(data_root, sweep_dir) + [
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.study_name=test",
        "trainer.fast_dev_run=true",
        *extra,
    ]


@pytest.mark.slow
def test_optuna_search_records_failed_trials_and_resumes_after_an_interruption(tmp_path, data_root):
    sweep_dir = tmp_path / "optuna"
    storage = f"sqlite:///{sweep_dir}/study.db"

    # The sweep process is killed when trial 1 starts training.
    first = run_cli(
        "train.py",
        optuna_command(
            data_root,
            sweep_dir,
            "+callbacks.interrupt._target_=tests.probes.InterruptJob",
            "+callbacks.interrupt.job=1",
        ),
        tmp_path,
    )
    assert first.returncode == -9, first.stderr[-3000:]
    states = [t.state.name for t in optuna.load_study(study_name="test", storage=storage).trials]
    assert states == ["COMPLETE", "RUNNING"]

    # The same command resumes the study; trial 2 raises (as an out-of-memory error would).
    second = run_cli(
        "train.py",
        optuna_command(
            data_root, sweep_dir, "+callbacks.fail._target_=tests.probes.FailJob", "+callbacks.fail.job=2"
        ),
        tmp_path,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    study = optuna.load_study(study_name="test", storage=storage)
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE"]
    assert study.user_attrs["interrupted_trials"] == [1]  # trial 2 failed by itself
    # One trial before the interruption and two after it: the study's three.
    assert "Best parameters: {" in second.stdout + second.stderr
    best = (sweep_dir / "optimization_results.yaml").read_text()
    assert "best_params" in best and "optimizer.lr" in best

    # Job folders continue the trial numbers; the leaderboard shows every trial, the cut-off one included.
    rows = {r["job"]: r["status"] for r in leaderboard_rows(sweep_dir)}
    assert rows == {"0": "completed", "1": "incomplete", "2": "failed", "3": "completed"}
    searched = json.loads((sweep_dir / "3" / "metrics.json").read_text())
    assert searched["val/acc_best"] == trials[3].value
    overrides = (sweep_dir / "3" / ".hydra" / "overrides.yaml").read_text()
    for key in ("optimizer.lr", "optimizer.weight_decay", "finetune", "augment", "data.batch_size"):
        assert f"{key}=" in overrides, key


def wandb_records(run_folder: Path) -> list[dict]:
    """The records of the one offline W&B run under a run folder, read with W&B's own inspector."""
    (log_file,) = run_folder.glob("wandb/offline-run-*/run-*.wandb")
    out = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(log_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def train_without_wandb_key(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """train.py as a user without a W&B key or login runs it: no WANDB_* variables, a clean home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(cwd / "home"), OMP_NUM_THREADS="2", SKUVISION_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,  # nothing may prompt
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def wandb_sweep(tmp_path_factory, data_root) -> Path:
    """A two-job multirun logged to W&B offline by a user without a key; its sweep folder. The resume test
    below continues its job 0 (hence no one-cycle schedule, which is fixed to its first run's length)."""
    tmp_path = tmp_path_factory.mktemp("wandb_sweep")
    sweep_dir = tmp_path / "sweep"
    overrides = sweep_overrides(data_root, sweep_dir) + [
        "model=simple_cnn",
        "logger=wandb",
        "seed=1,2",
        "trainer.max_epochs=1",
        "data.subset=200",
        "scheduler=none",
    ]
    train_without_wandb_key(["-m", *overrides], tmp_path)
    return sweep_dir


@pytest.mark.slow
def test_each_job_of_a_multirun_is_its_own_offline_wandb_run(wandb_sweep):
    sweep_dir = wandb_sweep
    runs = []
    for job in ("0", "1"):
        records = wandb_records(sweep_dir / job)
        (run,) = [r["run"] for r in records if r["type"] == "run"]
        assert run["run_group"] == str(sweep_dir)
        assert run["tags"] == ["simple_cnn", "full", "fashion_mnist"]
        config = {}
        for r in records:
            if r["type"] == "config":
                config.update(r["config"]["update"])
        assert config["seed"] == int(job) + 1
        assert config["class_names"][0] == "T-shirt/top"
        history = {k for r in records if r["type"] == "history" for k in r["history"]["item"]}
        assert {"val/acc", "train/loss", "test/acc"} <= history
        runs.append(run["run_id"])
    assert runs[0] != runs[1]


@pytest.mark.slow
def test_resuming_from_a_checkpoint_continues_the_same_wandb_run(tmp_path, data_root, wandb_sweep):
    """The first run is job 0 of the sweep above (one epoch, no schedule); this one resumes it."""
    first = wandb_sweep / "0"
    overrides = quick_overrides("fashion_mnist", data_root) + [
        "logger=wandb",
        "data.subset=200",
        "test=false",
        "scheduler=none",  # a one-cycle schedule is fixed to its first run's length
        "trainer.max_epochs=2",
        f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}",
    ]
    train_without_wandb_key(overrides, tmp_path)
    (resumed,) = (tmp_path / "outputs").glob("*/*")
    ids = [[r["run"]["run_id"] for r in wandb_records(f) if r["type"] == "run"][0] for f in (first, resumed)]
    assert ids[0] == ids[1]
