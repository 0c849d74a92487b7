"""embed.py add_to=<embed run folder>: new items into a copy of that run's index, and items out, in a new run
folder; the earlier run folder is only read.

`input=` images are embedded with the checkpoint the earlier index was built with (checked by its SHA-256,
which index.json records; ckpt_path may be left out: the recorded one is used). `remove=` takes ids (a list,
or a text file with one id per line). The new run folder holds what embed.py writes: embeddings.npz (every
item's vector, in index order, with its id), index/ (the grown index; an approximate kind with its recall
measured again) and, when items were added, neighbours.csv of the new items.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import faiss
import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from skuvision.assembly import build_trainer, from_checkpoint
from skuvision.config import plain, set_threads
from skuvision.data.inputs import InputFilesDataModule, collect_inputs
from skuvision.errors import SkuvisionError
from skuvision.features import extract
from skuvision.index import CatalogueIndex
from skuvision.outputs import file_sha256, new_file, refuse_existing
from skuvision.tasks.utils import command, print_summary, resolve_checkpoint, shown

log = logging.getLogger("skuvision")

RESULTS = ("embeddings.npz", "index", "neighbours.csv")
INDEX_FILES = ("index.faiss", "items.csv", "index.json")
ID_FILE_BYTES = 64 << 20  # a list of ids; anything bigger is not one


def embed_changes(cfg: DictConfig, neighbours_of_items, write_neighbours) -> dict:
    """The run (see the module's doc); embed.py passes its own helpers in, so that this module does not
    import embed.py back."""
    set_threads(cfg.get("threads"))
    if cfg.get("threads"):
        faiss.omp_set_num_threads(int(cfg.threads))
    earlier = Path(str(cfg.add_to)).expanduser()
    index, features = earlier_run(earlier)
    remove = ids_to_remove(cfg.get("remove"))
    unknown = sorted(remove - set(index.ids))
    if unknown:  # before any image is embedded
        raise SkuvisionError(
            f"remove: {len(unknown)} id(s) not in {earlier / 'index' / 'items.csv'} "
            f"({', '.join(map(str, unknown[:5]))}{', ...' if len(unknown) > 5 else ''}); pick ids from "
            "its id column"
        )
    if not cfg.get("input") and not remove:
        raise SkuvisionError(
            f"add_to={earlier}: nothing to change; give input=<new images> and/or remove=[id,...] (ids "
            "are in its index/items.csv)"
        )
    output_dir = Path(cfg.paths.output_dir)
    written = {name: output_dir / name for name in RESULTS}
    refuse_existing(written.values(), "run it into a new run folder, or remove it")
    new_features, new_items = None, []
    if cfg.get("input"):
        checkpoint = same_checkpoint(cfg, index, earlier)
        module, _ = from_checkpoint(checkpoint, None, split=None)
        trainer = build_trainer(cfg, devices=1, num_nodes=1, strategy="auto", enable_checkpointing=False)
        paths = [Path(os.path.abspath(p)) for p in collect_inputs(plain(cfg.input))]
        files = InputFilesDataModule(paths, module.input_config, cfg.batch_size, cfg.num_workers)
        found = extract(trainer, module, files)
        vectors, errors = found.features, found.per_image()
        for path, error in zip(paths, errors, strict=True):
            if error:
                log.warning("skipping unreadable %s (%s)", path, error)
        keep = [i for i, e in enumerate(errors) if not e]
        if not keep:
            raise SkuvisionError(f"input={cfg.input}: no readable image to add")
        new_features, new_items = vectors[keep].numpy(), [str(paths[i]) for i in keep]
        refuse_duplicates(index, remove, new_items, earlier)
    grown, all_features = index.changed(features, remove, new_features, new_items, source=str(earlier))
    with new_file(written["embeddings.npz"]) as partial:
        labels = grown.labels
        np.savez(
            partial,
            features=all_features,
            items=np.array(grown.items),
            # -1: an item added without a label
            labels=np.array([-1 if v is None else v for v in labels]) if labels else np.array([]),
            class_names=np.array(grown.class_names),
            ids=np.array(grown.ids, dtype=np.int64),
        )
    grown.save(written["index"])
    if new_items and len(grown) > 1:
        added = np.arange(len(grown) - len(new_items), len(grown))
        scores, found = neighbours_of_items(grown, all_features, cfg.k, rows=added)
        write_neighbours(written["neighbours.csv"], new_items, scores, found, grown.items)
    result = {
        "embeddings": str(written["embeddings.npz"]),
        "index": str(written["index"]),
        "index_info": grown.info,
        "added_ids": grown.ids[len(grown) - len(new_items) :],
        "removed_ids": sorted(remove),
    }
    changes_summary(cfg, written, result, grown)
    return result


def changes_summary(cfg: DictConfig, written: dict[str, Path], result: dict, index: CatalogueIndex) -> str:
    info = index.info
    figures = {
        "items": info["count"],
        "added": len(result["added_ids"]),
        "removed": len(result["removed_ids"]),
    }
    if "recall@10" in info:
        figures["recall@10"] = f"{info['recall@10']:.4f}"
    if "recall@10_added" in info:
        figures["recall@10 of the new items"] = f"{info['recall@10_added']:.4f}"
    checkpoint = info.get("checkpoint") or "<checkpoint>"
    run = written["index"].parent
    return print_summary(
        "embed add_to",
        [p for p in written.values() if p.exists()],
        figures,
        [command("serve.py", f"ckpt_path={shown(checkpoint)}", f"index={shown(run)}")],
    )


def plain_file(path: Path, what: str) -> None:
    if path.is_symlink():
        raise SkuvisionError(
            f"{what}: {path} is a symbolic link, which an embed run folder never holds; give the folder "
            "embed.py wrote itself"
        )


def earlier_run(folder: Path) -> tuple[CatalogueIndex, np.ndarray]:
    """The index of embed.py's run folder `folder` and its stored vectors (embeddings.npz), which must agree
    item for item; links and missing files are refused."""
    key = f"add_to={folder}"
    plain_file(folder, key)
    if not folder.is_dir():
        raise SkuvisionError(f"{key}: no such folder; give the run folder of an earlier embed.py run")
    needed = [folder / "embeddings.npz", folder / "index", *(folder / "index" / n for n in INDEX_FILES)]
    for path in needed:
        plain_file(path, key)
    missing = [str(p.relative_to(folder)) for p in needed if not p.exists()]
    if missing:
        raise SkuvisionError(
            f"{key}: not an embed run folder (missing {', '.join(missing)}); give the run folder embed.py "
            "wrote"
        )
    index = CatalogueIndex.load(folder / "index")
    npz = folder / "embeddings.npz"
    try:
        with np.load(npz, allow_pickle=False) as saved:
            features, items = saved["features"], saved["items"].tolist()
            ids = saved["ids"].tolist() if "ids" in saved else list(range(len(items)))
    except (OSError, ValueError, KeyError) as err:
        raise SkuvisionError(f"{npz}: unreadable ({err}); rerun embed.py for this catalogue") from err
    if items != index.items or ids != index.ids:
        raise SkuvisionError(
            f"{npz}: its items differ from index/items.csv's (a file of another run?); rerun embed.py for "
            "this catalogue"
        )
    if features.ndim != 2 or features.shape[1] != index.dim:
        raise SkuvisionError(
            f"{npz}: vectors of shape {features.shape}, the index has dimension {index.dim} (its index.json)"
        )
    return index, features


def same_checkpoint(cfg: DictConfig, index: CatalogueIndex, earlier: Path) -> Path:
    """ckpt_path (left out: the one the index records), refused unless it is the checkpoint the index was
    built with: the same SHA-256 (an index built before hashes were recorded: the same file)."""
    recorded, digest = index.info.get("checkpoint"), index.info.get("checkpoint_sha256")
    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.ckpt_path is None:
        if not recorded:
            raise SkuvisionError(
                f"ckpt_path: add_to={earlier}'s index records no checkpoint; give ckpt_path="
            )
        cfg.ckpt_path = recorded
    checkpoint = resolve_checkpoint(cfg)
    if digest:
        if file_sha256(checkpoint) != digest:
            raise SkuvisionError(
                f"ckpt_path={checkpoint}: not the checkpoint add_to={earlier}'s index was built with "
                f"(SHA-256 differs from its index.json's; that was {recorded}): new vectors would not be "
                "comparable; embed the whole catalogue with this checkpoint instead"
            )
    elif not recorded or Path(recorded).resolve() != checkpoint.resolve():
        raise SkuvisionError(
            f"ckpt_path={checkpoint}: add_to={earlier}'s index was built with {recorded} (it records no "
            "hash): give that checkpoint, or embed the whole catalogue anew"
        )
    else:
        log.warning(
            "%s records no checkpoint hash: the same checkpoint file is trusted to be unchanged", earlier
        )
    return checkpoint


def ids_to_remove(value) -> set[int]:
    """remove=: an id, a list of ids, or a text file with one id per line (# starts a comment)."""
    if value is None:
        return set()
    if isinstance(value, (list, tuple, ListConfig)):
        entries = [(f"remove={list(value)}", v) for v in value]
    elif isinstance(value, int) and not isinstance(value, bool):
        entries = [(f"remove={value}", value)]
    else:
        path = Path(str(value)).expanduser()
        if not path.is_file():
            raise SkuvisionError(
                f"remove={value}: no such file; give ids as remove=[3,17] or a text file with one id per line"
            )
        if os.path.getsize(path) > ID_FILE_BYTES:
            raise SkuvisionError(f"remove={path}: over {ID_FILE_BYTES >> 20} MB, not a list of ids")
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise SkuvisionError(f"remove={path}: unreadable ({err}); give a text file of ids") from err
        entries = [
            (f"remove={path} line {n}", line.split("#")[0].strip())
            for n, line in enumerate(lines, 1)
            if line.split("#")[0].strip()
        ]
    ids = set()
    for where, entry in entries:
        try:
            if isinstance(entry, bool) or float(entry) != int(entry):
                raise ValueError
            ids.add(int(entry))
        except (ValueError, TypeError):
            raise SkuvisionError(
                f"{where}: {entry!r} is not an item id (a whole number from items.csv)"
            ) from None
    return ids


def refuse_duplicates(index: CatalogueIndex, remove: set[int], new_items: list[str], earlier: Path) -> None:
    """A new image that is already an item (the same file, by absolute path), unless its id goes in this
    run; the same file given twice."""
    kept = {
        os.path.abspath(item): item_id
        for item_id, item in zip(index.ids, index.items, strict=True)
        if item_id not in remove
    }
    seen: set[str] = set()
    for item in new_items:
        if item in kept:
            raise SkuvisionError(
                f"input: {item} is already item {kept[item]} of add_to={earlier}; leave it out, or remove="
                f"[{kept[item]}] in the same run to replace it"
            )
        if item in seen:
            raise SkuvisionError(f"input: {item} is given twice; give each new image once")
        seen.add(item)
