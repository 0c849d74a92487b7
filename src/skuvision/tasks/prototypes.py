"""`prototypes=` of predict.py and serve.py: a folder of new classes (built, then saved in the run folder) or
the prototypes.npz an earlier run saved (checked against the checkpoint); see skuvision.prototypes."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from skuvision import prototypes as protos
from skuvision.assembly import build_trainer, data_module, from_checkpoint
from skuvision.errors import SkuvisionError

log = logging.getLogger("skuvision")


def check_prototype_options(cfg: DictConfig, module, sharded: bool) -> None:
    """What prototypes= cannot be combined with, refused before any image is read."""
    if not cfg.get("prototypes"):
        return
    if module.multi_head is not None:
        raise SkuvisionError("prototypes= works with one-label models; this checkpoint has several heads")
    if cfg.get("calibration"):
        raise SkuvisionError(
            "prototypes= with calibration=: the calibration's threshold was chosen without the new classes; "
            "leave out calibration="
        )
    if cfg.get("explain"):
        raise SkuvisionError(
            "prototypes= with explain=: Grad-CAM explains the trained head only; leave one out"
        )
    if sharded:
        raise SkuvisionError("prototypes= runs on one process: leave out shards= and trainer=ddp*")


def prototypes_for(cfg: DictConfig, module, trainer) -> protos.Prototypes:
    """The prototypes cfg.prototypes names, for cfg.ckpt_path: a file is loaded and checked; a folder of class
    folders is built (one pass over the checkpoint's training split for the centring mean) and saved as the
    run folder's prototypes.npz."""
    source = Path(str(cfg.prototypes)).expanduser()
    if source.is_file():
        loaded = protos.load(source, cfg.ckpt_path, module.class_names)
        log.info("prototypes: %d new classes from %s", len(loaded.class_names), source)
        return loaded
    protos.class_folders(source, module.class_names)  # refused before the training split is read
    train = data_module(module.hparams.data, module.input_config, "train")
    built = protos.build(
        source, cfg.ckpt_path, trainer, module, train, int(cfg.batch_size), int(cfg.num_workers)
    )
    saved = built.save(Path(cfg.paths.output_dir) / protos.FILE_NAME)
    counts = ", ".join(f"{n} ({c})" for n, c in zip(built.class_names, built.counts, strict=True))
    print(f"prototypes: {saved}  (new classes: {counts}); reuse it with prototypes={saved}")
    return built


def prototypes_file(cfg: DictConfig, card) -> Path | None:
    """serve.py's prototypes= for the served model `card`: a file is checked and returned; a folder is built
    on the CPU (the model loaded here for it) and saved in the run folder first. None without prototypes=."""
    if not cfg.get("prototypes"):
        return None
    if card.heads is not None:
        raise SkuvisionError("prototypes= works with one-label models; this checkpoint has several heads")
    source = Path(str(cfg.prototypes)).expanduser()
    if source.is_file():
        protos.load(source, cfg.ckpt_path, card.class_names)
        return source
    module, _ = from_checkpoint(cfg.ckpt_path)
    cpu = OmegaConf.create({"trainer": {"_target_": "pytorch_lightning.Trainer", "accelerator": "cpu"}})
    trainer = build_trainer(cpu, devices=1, enable_checkpointing=False, enable_progress_bar=False)
    settings = OmegaConf.create(
        {"ckpt_path": cfg.ckpt_path, "prototypes": str(source), "batch_size": 64, "num_workers": 0}
    )
    settings.paths = cfg.paths
    prototypes_for(settings, module, trainer)
    return Path(cfg.paths.output_dir) / protos.FILE_NAME
