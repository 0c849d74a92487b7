"""embed(cfg): pre-logit features of a split or of image files, for similar-product search.

Writes embeddings.npz (L2-normalized features with their items and labels), a CatalogueIndex of them in index/
(FAISS; exact by default), the k nearest neighbours of every item (or of one query image) found with that
index, and, for a labelled split, retrieval quality by exact search: recall@1/5/10 and mAP.

With input= files, or a split of files (image folder, manifest), of litdata shards (data=streaming) or held
in memory (Fashion-MNIST, CIFAR), on several processes (trainer=ddp, ddp_cpu, multinode) each process
writes its images' features in shards in the run folder's shards/ and rank zero merges them in input order
(skuvision.shards); a rerun with hydra.run.dir=<that run folder> skips the images finished shards hold. A
split of litdata shards is in the order shard.py stored it (each image's `index`, its row in the source
split), on one process too; its items, like an in-memory split's, are named `<split>[<index>]`.

add_to=<an earlier embed run folder> adds input= images to a copy of its index and takes remove= ids out, in
a new run folder (skuvision.tasks.embed_changes).
"""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np
import torch
from omegaconf import DictConfig

from skuvision.assembly import build_trainer, from_checkpoint
from skuvision.config import plain, set_threads
from skuvision.data.inputs import InputFilesDataModule, collect_inputs
from skuvision.errors import SkuvisionError
from skuvision.features import extract, normalized
from skuvision.index import CatalogueIndex, index_params
from skuvision.metrics import retrieval_report
from skuvision.outputs import file_sha256, new_file, refuse_existing, write_csv, write_new_json
from skuvision.shards import plan_of, predict_in_shards, sharded
from skuvision.tasks.embed_changes import embed_changes
from skuvision.tasks.splits import first_labels, prepared_split, split_outputs
from skuvision.tasks.utils import command, print_summary, resolve_checkpoint, shown

log = logging.getLogger("skuvision")

RESULTS = ("embeddings.npz", "index", "neighbours.csv", "retrieval.json")  # in the run folder


def features_of(trainer, module, datamodule) -> tuple[torch.Tensor, list]:
    """Normalized features (skuvision.features) and each image's meta: its label (with several heads, the
    first label column's), or its read error."""
    found = extract(trainer, module, datamodule)
    return found.features, found.per_image(module.heads[0].column)


def features_in_shards(cfg: DictConfig, trainer, module, items: list[str], **plan) -> tuple | None:
    """Features of the files `items` written in shards by every process, merged on rank zero: (normalized
    features, read errors) in the order of `items`; None on the other ranks."""
    plan = plan_of("embed", cfg.ckpt_path, items, precision=str(trainer.precision), **plan)
    merged = predict_in_shards(cfg, trainer, module, [Path(p) for p in items], plan)
    return None if merged is None else (normalized(merged[0]), merged[1])


def embed(cfg: DictConfig) -> dict:
    if cfg.get("add_to") is not None:
        return embed_changes(cfg, neighbours_of_items, write_neighbours)
    if cfg.get("remove") is not None:
        raise SkuvisionError("remove: takes ids out of an earlier index; give add_to=<its embed run folder>")
    set_threads(cfg.get("threads"))
    resolve_checkpoint(cfg)
    if cfg.get("threads"):
        faiss.omp_set_num_threads(int(cfg.threads))  # FAISS has its own OpenMP pool
    output_dir = Path(cfg.paths.output_dir)
    written = {name: output_dir / name for name in RESULTS}
    refuse_existing(written.values(), "run it into a new run folder, or remove it")
    index_settings(cfg)
    split = None if cfg.get("input") else cfg.split
    module, datamodule = from_checkpoint(cfg.ckpt_path, cfg.get("data"), split=split)
    module.predict_embeddings = True  # what the sharded runs store (skuvision.shards): raw features
    trainer = build_trainer(cfg, enable_checkpointing=False)
    if cfg.get("input"):
        items = [str(p) for p in collect_inputs(plain(cfg.input))]
        if sharded(cfg, trainer):
            merged = features_in_shards(cfg, trainer, module, items)
            if merged is None:  # not rank zero: rank zero writes the results
                return {}
            features, errors = merged
        else:
            files = InputFilesDataModule(
                [Path(p) for p in items],
                module.input_config,
                cfg.batch_size,
                cfg.num_workers,
                cache=bool(cfg.get("cache", False)),
            )
            features, errors = features_of(trainer, module, files)
        keep = [i for i, e in enumerate(errors) if not e]
        for i in set(range(len(items))) - set(keep):
            log.warning("skipping unreadable %s (%s)", items[i], errors[i])
        features, items, labels = features[keep], [items[i] for i in keep], None
        source = f"input={cfg.input}"
    else:
        prepared_split(datamodule, cfg.split)
        got = split_outputs(cfg, trainer, module, datamodule, "embed")
        if got is None:  # not rank zero: rank zero writes the results
            return {}
        if any(got.errors):
            bad = next(i for i, e in enumerate(got.errors) if e)
            raise SkuvisionError(f"split={cfg.split}: {got.items[bad]} became unreadable ({got.errors[bad]})")
        features, items = normalized(got.outputs), got.items
        labels = torch.as_tensor(first_labels(got.labels, module))
        source = f"split={cfg.split}"
    check_enough_items(len(items), source, bool(cfg.get("query")), labels is not None)
    result: dict = {"embeddings": str(written["embeddings.npz"]), "dim": features.shape[1]}
    index = build_index(cfg, features.numpy(), items, labels, module.class_names)
    if cfg.get("query"):
        query_files = InputFilesDataModule(collect_inputs(str(cfg.query)), module.input_config, 1, 0)
        if trainer.world_size > 1:  # one image on one process (the others have returned)
            trainer = build_trainer(cfg, devices=1, num_nodes=1, strategy="auto", enable_checkpointing=False)
        query, errors = features_of(trainer, module, query_files)
        if errors[0]:
            raise SkuvisionError(f"query={cfg.query}: cannot read it ({errors[0]})")
        queries = [str(cfg.query)]
        scores, indices = index.search(query.numpy(), min(cfg.k, len(index)))
    else:
        queries = items
        scores, indices = neighbours_of_items(index, features.numpy(), cfg.k)
    if labels is not None:
        result["retrieval"] = retrieval_report(features, labels, cfg.queries, cfg.seed)
    # Everything is computed: a refusal or an unreadable query above has written nothing.
    with new_file(written["embeddings.npz"]) as partial:
        np.savez(
            partial,
            features=features.numpy(),
            items=np.array(items),
            labels=labels.numpy() if labels is not None else np.array([]),
            class_names=np.array(module.class_names),
        )
    index.save(written["index"])
    result["index"] = str(written["index"])
    result["index_info"] = index.info
    write_neighbours(written["neighbours.csv"], queries, scores, indices, items)
    if cfg.get("query"):
        for rank, (s, i) in enumerate(zip(scores[0].tolist(), indices[0].tolist(), strict=True), 1):
            print(f"{rank:3d}. {s:.4f}  {items[i]}")
    if labels is not None:
        write_new_json(written["retrieval.json"], result["retrieval"])
        r = result["retrieval"]
        print(
            f"retrieval on {cfg.split}: recall@1 {r['recall@1']:.4f}  recall@5 {r['recall@5']:.4f}  "
            f"recall@10 {r['recall@10']:.4f}  mAP {r['mAP']:.4f}"
        )
    embed_summary(cfg, written, result)
    return result


def embed_summary(cfg: DictConfig, written: dict[str, Path], result: dict) -> str:
    """Its run folder (what serve.py's index= takes) and the serve command."""
    run = written["index"].parent
    figures = {"items": result["index_info"]["count"]}
    if "retrieval" in result:
        figures["recall@1"] = f"{result['retrieval']['recall@1']:.4f}"
    return print_summary(
        "embed",
        [p for p in written.values() if p.exists()],
        figures,
        [command("serve.py", f"ckpt_path={shown(cfg.ckpt_path)}", f"index={shown(run)}")],
    )


def check_enough_items(count: int, source: str, query: bool, labelled: bool) -> None:
    """An index needs an item; each item's neighbours, and retrieval quality, need another one."""
    if count == 0:
        raise SkuvisionError(f"{source}: no readable image to embed")
    if count == 1 and (labelled or not query):
        raise SkuvisionError(
            f"{source}: one image has no neighbours; embed at least 2"
            + ("" if labelled else ", or search this one with query=<image>")
        )


def index_settings(cfg: DictConfig) -> tuple[str, dict]:
    """index.kind and its parameters, checked before any image is embedded."""
    node = cfg.index
    params = {"recall_queries": node.recall_queries, "seed": cfg.seed, **(plain(node.get(node.kind)) or {})}
    index_params(node.kind, dict(params))
    return node.kind, params


def build_index(cfg: DictConfig, features: np.ndarray, items, labels, class_names) -> CatalogueIndex:
    kind, params = index_settings(cfg)
    labels = labels.numpy() if labels is not None else None
    return CatalogueIndex.build(
        features,
        items,
        labels,
        class_names,
        kind=kind,
        checkpoint=str(cfg.ckpt_path),
        checkpoint_sha256=file_sha256(cfg.ckpt_path),  # what embed.py add_to= checks its checkpoint against
        **params,
    )


def neighbours_of_items(
    index: CatalogueIndex, features: np.ndarray, k: int, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each item's (or the items' at index `rows`) k nearest other items: one more is searched and the item
    itself dropped (or the last one, where ties or an approximate index left the item out)."""
    k = min(k, len(index) - 1)
    rows = np.arange(len(features)) if rows is None else np.asarray(rows)
    scores, indices = index.search(features[rows], k + 1)
    own = indices == rows[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), k)
    keep = np.ones_like(own)
    keep[np.arange(len(indices)), drop] = False
    return scores[keep].reshape(-1, k), indices[keep].reshape(-1, k)


def write_neighbours(path: Path, queries: list[str], scores, indices, items: list[str]) -> None:
    rows = [
        [query, rank, items[i], f"{s:.6f}"]
        for query, row_scores, row_indices in zip(queries, scores.tolist(), indices.tolist(), strict=True)
        for rank, (s, i) in enumerate(zip(row_scores, row_indices, strict=True), 1)
    ]
    write_csv(path, ["query", "rank", "item", "cosine"], rows)
