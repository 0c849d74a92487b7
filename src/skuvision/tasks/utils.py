"""What every task shares: images for the loggers, JSON out (metrics, the data report), and the command
line's one-line errors and new run folders.

The commands import this before Hydra composes a config (run_cli, NewRunFolder): the libraries of models
and data are imported where they are used, so a config mistake is answered without loading torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from skuvision.compat import rerun_by_lightning_ddp
from skuvision.config import in_multirun
from skuvision.errors import SkuvisionError
from skuvision.outputs import replacing_file, taken

if TYPE_CHECKING:
    from pytorch_lightning import LightningDataModule
    from pytorch_lightning.loggers import Logger

log = logging.getLogger("skuvision")


def log_images(loggers: list[Logger], pngs: list[Path]) -> None:
    """The evaluation plots into the loggers that show images (TensorBoard, W&B)."""
    import numpy as np
    from PIL import Image

    for logger in loggers:
        kind = type(logger).__name__
        if kind == "TensorBoardLogger":
            for png in pngs:
                image = np.asarray(Image.open(png).convert("RGB"))
                logger.experiment.add_image(f"eval/{png.stem}", image, dataformats="HWC")
        elif kind == "WandbLogger":
            logger.log_image(key="eval", images=[str(p) for p in pngs], caption=[p.stem for p in pngs])


def write_json(path: Path, data: dict) -> None:
    """A file the run may write again (train's, when it resumes), replaced whole; results of the other tasks
    go through skuvision.outputs.write_new_json, which never replaces."""
    with replacing_file(path) as partial:
        partial.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_data_report(datamodule: LightningDataModule, output_dir: Path) -> None:
    """class_counts.json per split, skipped_images.json when unreadable images were left out, and for a
    table with several label or tag columns columns.json (the heads, missing values, the taxonomy found)."""
    report = datamodule.data_report()
    write_json(output_dir / "class_counts.json", report["class_counts"])
    if "columns" in report:
        write_json(output_dir / "columns.json", report["columns"])
    skipped = report["skipped"]
    if skipped:
        write_json(output_dir / "skipped_images.json", skipped)
        log.warning(
            "%d unreadable image(s) skipped: listed in %s", len(skipped), output_dir / "skipped_images.json"
        )


def resolve_checkpoint(cfg: DictConfig) -> Path:
    """cfg.ckpt_path as a checkpoint file (a run folder becomes its tested checkpoint), set back into cfg so
    that every record of the run names the file."""
    from skuvision.checkpoints import checkpoint_file

    path = checkpoint_file(cfg.ckpt_path)
    cfg.ckpt_path = str(path)
    return path


# What Hydra's override grammar takes unquoted in a value; anything else is quoted.
HYDRA_PLAIN = re.compile(r"[A-Za-z0-9_\-+./%:@]*")


def hydra_quoted(value: str) -> str:
    """`value` as one Hydra override value: quoted where needed, with its quotes (and the backslashes
    before them, or at its end) escaped as Hydra's grammar reads them, and `${` kept from interpolating."""
    if HYDRA_PLAIN.fullmatch(value) and value not in ("", "null", "true", "false"):
        return value
    value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)
    return "'" + value.replace("${", "\\${") + "'"


def command(script: str, *overrides: str) -> str:
    """`python <script> key=value ...`, each value quoted as Hydra and then the shell need it to arrive
    whole (a path with a space or a comma); a `<placeholder>` value is left for the user to replace."""
    words = ["python", script]
    for override in overrides:
        key, _, value = override.partition("=")
        if value.startswith("<") and value.endswith(">"):
            words.append(override)
        else:
            words.append(shlex.quote(f"{key}={hydra_quoted(value)}"))
    return " ".join(words)


def shown(path: str | Path) -> str:
    """A path as a user types it: relative to the working folder when below it."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_summary(task: str, wrote: list, figures: dict | None = None, next_commands: list[str] = ()) -> str:
    """The few lines every task ends with: its figures, the files it wrote, the commands that take them."""
    lines = [f"{task} done" + (": " + ", ".join(f"{k} {v}" for k, v in figures.items()) if figures else "")]
    for label, items in (("wrote:", [shown(p) for p in wrote]), ("next: ", list(next_commands))):
        for k, item in enumerate(items):
            lines.append(f"  {label if k == 0 else ' ' * len(label)} {item}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def stage_metrics(trainer, prefix: str) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith(prefix)}


def run_cli(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run a task from a Hydra shim: a SkuvisionError becomes one line on stderr and exit status 2.

    In a multirun, a job that fails for any reason is recorded in its run folder (failed.json, with the
    traceback) and returns None, so the sweep goes on and its leaderboard shows the failure.
    """
    try:
        return task(cfg)
    except Exception as raised:
        err = unwrapped(raised)
        if isinstance(err, MissingMandatoryValue):
            err = missing_value_error(err, cfg)
        if in_multirun():
            return record_failed_job(err)
        if not isinstance(err, SkuvisionError):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


class NewRunFolder(HydraCallback):
    """Every task but train (which re-enters its own run folder to resume) starts in a new or empty folder:
    checked before Hydra writes its .hydra/ config and the log there, so an earlier run's files stay as they
    were (`hydra.run.dir=<an earlier run>` would otherwise replace its config)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.run.dir)
        if rerun_by_lightning_ddp(config.hydra.output_subdir):
            return  # rank > 0 of trainer=ddp: Lightning re-ran the command into rank zero's run folder
        if unfinished_shards(folder, config):
            refuse_links(folder)
            print(f"resuming the unfinished run in {folder} (its finished shards are kept)", file=sys.stderr)
            return  # predict/embed on shards: the task checks the plan and refuses a finished run's results
        refuse_used_folder(folder, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        if any(unfinished_shards(job, config) for job in folder.glob("*/")):
            for place in [folder, *folder.glob("*/")]:
                refuse_links(place)
            print(
                f"resuming the unfinished jobs in {folder} (their finished shards are kept)", file=sys.stderr
            )
            return  # e.g. a SLURM predict/embed submitted again with the same hydra.sweep.dir
        refuse_used_folder(folder, "hydra.sweep.dir")


def unfinished_shards(folder: Path, config: DictConfig) -> bool:
    """Whether `folder` holds shards of a predict or embed run that did not get to merge them."""
    if not folder.is_dir():
        return False  # a new run folder (the usual case) needs no look, nor shards.py's libraries
    from skuvision.shards import FOLDER, PLAN

    return (folder / FOLDER / PLAN).is_file() and not finished(folder, config)


def finished(folder: Path, config: DictConfig) -> bool:
    """Whether predict or embed merged its shards into its result already (then it is not resumed)."""
    result = config.get("output") or folder / (
        "embeddings.npz" if config.task_name == "embed" else "predictions.csv"
    )
    return taken(Path(result))


def refuse_links(folder: Path) -> None:
    """Before Hydra writes its config and log into a run folder it resumes: no symbolic link there."""
    from skuvision.shards import links_in_run_folder

    links = links_in_run_folder(folder)
    if links:
        print(
            f"error: {links[0]} is a symbolic link, which a run folder never holds: nothing was written; "
            "remove it, or start a new run",
            file=sys.stderr,
        )
        sys.exit(2)


def refuse_used_folder(folder: Path, key: str) -> None:
    if not taken(folder):
        return
    held = sorted(os.listdir(folder)) if folder.is_dir() else []
    shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
    print(
        f"error: {key}={folder} already holds {shown or 'a file'}: nothing was written; leave {key} at its "
        "default (a new folder for every run) or give a new folder",
        file=sys.stderr,
    )
    sys.exit(2)


# An example value for each mandatory (???) key of conf/, shown when a command line leaves one out.
MANDATORY_EXAMPLES = {
    "ckpt_path": "outputs/<date>/<time> (a train.py run folder, or a .ckpt in its checkpoints/)",
    "input": "photos/ (a folder, an image, or a text file with one path per line)",
    "data.root": "/path/to/photos (data=manifest: the .csv; data=streaming: the folder shard.py wrote)",
    "output": "shards/ (a new folder, or s3://bucket/prefix)",
    "sweep_dir": "multirun/<date>/<time>",
    "model.name": "resnet50",
}


def missing_value_error(err: MissingMandatoryValue, cfg: DictConfig) -> SkuvisionError:
    """OmegaConf's multi-line MissingMandatoryValue as one line naming the key, with an example."""
    key = err.full_key or err.key or "a mandatory setting"
    example = MANDATORY_EXAMPLES.get(str(key), "<value>")
    script = f"{cfg.get('task_name') or 'train'}.py"
    return SkuvisionError(
        f"{key} is not set: give it on the command line, e.g. python {script} {key}={example}"
    )


def unwrapped(err: Exception) -> Exception:
    """The error a config's `_target_` raised, out of the InstantiationException Hydra wraps it in."""
    while isinstance(err, InstantiationException) and isinstance(err.__cause__, Exception):
        err = err.__cause__
    return err


def record_failed_job(err: Exception) -> None:
    hydra_cfg = HydraConfig.get()
    # A SkuvisionError's message is already the one line to show; other errors need their type.
    message = str(err) if isinstance(err, SkuvisionError) else f"{type(err).__name__}: {err}"
    message = message.splitlines()[0]
    failed = {
        "error": message,
        "overrides": " ".join(hydra_cfg.overrides.task),
        "traceback": traceback.format_exc(),
    }
    write_json(Path(hydra_cfg.runtime.output_dir) / "failed.json", failed)
    log.error("job %s failed: %s", hydra_cfg.job.num, message)
    return None
