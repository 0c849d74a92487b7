"""predict(cfg): a checkpoint on new images -> predictions.csv (path, top-k labels and probabilities)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from skuvision.data.files import InputFilesDataModule, collect_inputs
from skuvision.tasks.assembly import from_checkpoint
from skuvision.tasks.utils import plain, set_threads
from skuvision.tta import check_tta

log = logging.getLogger("skuvision")


def predict(cfg: DictConfig) -> Path:
    set_threads(cfg.get("threads"))
    module, _ = from_checkpoint(cfg.ckpt_path)
    module.tta = check_tta(cfg.get("tta") or module.tta)
    paths = collect_inputs(plain(cfg.input))
    datamodule = InputFilesDataModule(
        paths, module.input_config, cfg.batch_size, cfg.num_workers, cache=bool(cfg.get("cache", False))
    )
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    outputs = trainer.predict(module, datamodule=datamodule)
    probs = torch.cat([o["outputs"] for o in outputs]).softmax(dim=1)
    errors = [e for o in outputs for e in o["meta"]]
    k = min(int(cfg.top_k), probs.shape[1])
    top_probs, top_index = probs.topk(k, dim=1)
    out = Path(cfg.output) if cfg.get("output") else Path(cfg.paths.output_dir) / "predictions.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    names = module.class_names
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["path", "error", *[f"{kind}_{i}" for i in range(1, k + 1) for kind in ("label", "prob")]]
        )
        for path, error, p, idx in zip(paths, errors, top_probs.tolist(), top_index.tolist(), strict=True):
            ranked = (
                [""] * 2 * k
                if error
                else [v for j, q in zip(idx, p, strict=True) for v in (names[j], f"{q:.6f}")]
            )
            writer.writerow([str(path), error, *ranked])
    failed = sum(bool(e) for e in errors)
    log.info("predicted %d image(s), %d unreadable", len(paths) - failed, failed)
    print(f"predictions: {out}  ({len(paths) - failed} images, {failed} unreadable)")
    return out
