"""compare(cfg): the leaderboard of a multirun, one row per job, failed jobs included.

Reads each job folder of the sweep (its .hydra config, metrics.json, failed.json) and writes leaderboard.md,
leaderboard.csv and leaderboard.png into the sweep folder. compare.py never replaces a leaderboard; the
sweep's own end-of-multirun callback rewrites it when the sweep goes on (a resumed Optuna study).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from skuvision.errors import SkuvisionError
from skuvision.outputs import new_file, refuse_existing, replacing_file, write_csv

log = logging.getLogger("skuvision")

# Leaderboard columns: (header, key of the row).
COLUMNS = [
    ("job", "job"),
    ("status", "status"),
    ("backbone", "backbone"),
    ("pretrained", "pretrained"),
    ("input px", "input_px"),
    ("finetune", "finetune"),
    ("lr", "lr"),
    ("weight decay", "weight_decay"),
    ("batch", "batch_size"),
    ("augment", "augment"),
    ("epochs", "epochs"),
    ("test acc %", "test_acc"),
    ("macro F1", "test_f1_macro"),
    ("best val acc %", "val_acc_best"),
    ("params (M)", "params_m"),
    ("train time (s)", "train_time_s"),
    ("img/s", "img_per_s"),
]
CSV_ONLY = [("overrides", "overrides"), ("error", "error"), ("run folder", "run_dir")]


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep (those with a .hydra config), in job order."""
    jobs = [d for d in sweep_dir.iterdir() if (d / ".hydra" / "config.yaml").is_file()]
    return sorted(jobs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def percent(fraction: float | None) -> float | None:
    return None if fraction is None else round(100 * fraction, 2)


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def job_row(job_dir: Path) -> dict:
    cfg = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
    hydra_yaml = job_dir / ".hydra" / "hydra.yaml"
    hydra_cfg = OmegaConf.load(hydra_yaml).hydra if hydra_yaml.is_file() else OmegaConf.create()
    choices = OmegaConf.select(hydra_cfg, "runtime.choices", default={}) or {}
    metrics, failed = read_json(job_dir / "metrics.json"), read_json(job_dir / "failed.json")

    def value(key: str):
        return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)

    if failed:
        status = "failed"
    elif metrics:
        status = "completed"
    else:
        status = "incomplete"  # killed, or still running
    params = metrics.get("model/params")
    return {
        "job": job_dir.name,
        "status": status,
        "backbone": value("model.name"),
        "pretrained": value("model.pretrained"),
        "input_px": metrics.get("model/input_px"),
        "finetune": choices.get("finetune"),
        "lr": value("optimizer.lr"),
        "weight_decay": value("optimizer.weight_decay"),
        "batch_size": value("data.batch_size"),
        "augment": choices.get("augment"),
        "epochs": metrics.get("fit/epochs"),
        "test_acc": percent(metrics.get("test/acc")),
        "test_f1_macro": rounded(metrics.get("test/f1_macro")),
        "val_acc_best": percent(metrics.get("val/acc_best")),
        "params_m": round(params / 1e6, 3) if params else None,
        "train_time_s": metrics.get("fit/time_s"),
        "img_per_s": round(metrics["fit/train_img_per_s"]) if "fit/train_img_per_s" in metrics else None,
        "overrides": " ".join(OmegaConf.select(hydra_cfg, "overrides.task", default=[]) or []),
        "error": failed.get("error"),
        "run_dir": str(job_dir),
    }


def ranked(rows: list[dict]) -> list[dict]:
    """Completed runs by test accuracy (val accuracy when untested), best first; then the others."""

    def key(row: dict):
        accuracy = row["test_acc"] if row["test_acc"] is not None else row["val_acc_best"]
        return (row["status"] != "completed", -(accuracy or 0.0), row["job"])

    return sorted(rows, key=key)


def cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict], sweep_dir: Path) -> str:
    headers = [h for h, _ in COLUMNS]
    lines = [
        f"# Leaderboard: {sweep_dir}",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(cell(row[k]) for _, k in COLUMNS) + " |" for row in rows]
    problems = [r for r in rows if r["status"] != "completed"]
    if problems:
        lines += ["", "Jobs without a result:", ""]
        for row in problems:
            reason = row["error"] or "no metrics.json: the job was killed or is still running"
            lines.append(
                f"- job {row['job']} ({row['overrides'] or 'no overrides'}): {row['status']}, {reason}"
            )
    return "\n".join(lines) + "\n"


def point_label(row: dict, rows: list[dict]) -> str:
    """The backbone, plus whatever else tells this run apart in the sweep: weights, strategy."""
    parts = [str(row["backbone"])]
    if len({r["pretrained"] for r in rows}) > 1:
        parts.append("pretrained" if row["pretrained"] else "scratch")
    if len({r["finetune"] for r in rows}) > 1:
        parts.append(str(row["finetune"]))
    return " / ".join(parts)


LEADERBOARD_FILES = ("leaderboard.md", "leaderboard.csv", "leaderboard.png")


def write_leaderboard(sweep_dir: Path, replace: bool = False) -> list[dict]:
    """leaderboard.md, .csv and .png in the sweep folder; returns the rows, best first. `replace`: the
    sweep's own rewrite of its leaderboard; otherwise an existing one is refused before anything is
    written."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SkuvisionError(
            f"sweep_dir={sweep_dir} is not a folder: pass the folder a multirun wrote, "
            "e.g. sweep_dir=multirun/2026-11-25/10-00-00-000000"
        )
    jobs = job_dirs(sweep_dir)
    if not jobs:
        raise SkuvisionError(
            f"sweep_dir={sweep_dir} holds no job folders (<job>/.hydra/config.yaml): "
            "pass the folder of a `python train.py -m ...` run"
        )
    if not replace:
        earlier = [sweep_dir / name for name in LEADERBOARD_FILES]
        refuse_existing(earlier, "remove the leaderboard files to write them again")
    rows = ranked([job_row(d) for d in jobs])
    writing = replacing_file if replace else new_file
    with writing(sweep_dir / "leaderboard.md") as partial:
        partial.write_text(markdown(rows, sweep_dir))
    write_csv(
        sweep_dir / "leaderboard.csv",
        [h for h, _ in COLUMNS + CSV_ONLY],
        [[cell(row[k]) for _, k in COLUMNS + CSV_ONLY] for row in rows],
        replace=replace,
    )
    points = [
        {
            "accuracy_pct": r["test_acc"] if r["test_acc"] is not None else r["val_acc_best"],
            "img_per_s": r["img_per_s"],
            "label": point_label(r, rows),
        }
        for r in rows
    ]
    title = f"test accuracy vs training throughput: {sweep_dir.parent.name}/{sweep_dir.name}"
    from skuvision.plots import leaderboard_png  # matplotlib and torch: only once there is a table to draw

    with writing(sweep_dir / "leaderboard.png") as partial:
        leaderboard_png(points, partial, title)
    return rows


def compare(cfg: DictConfig) -> list[dict]:
    sweep_dir = Path(cfg.sweep_dir)
    rows = write_leaderboard(sweep_dir)
    done = sum(r["status"] == "completed" for r in rows)
    print((sweep_dir / "leaderboard.md").read_text())
    print(f"{done} of {len(rows)} jobs completed; leaderboard.md, .csv and .png in {sweep_dir}")
    return rows
