"""CatalogueIndex: FAISS vector search over L2-normalized embeddings (inner product == cosine).

Kinds: `flat` (exact, FAISS's IndexFlatIP; the default, fine up to ~100k items), `hnsw` (graph, HNSW{M}) and
`ivfpq` (inverted lists of product-quantized codes, IVF{nlist},PQ{m}x{nbits}) for larger catalogues. An
approximate index measures its recall@10 against exact search on a sample of catalogue items when built.

On disk, a folder: index.faiss (FAISS's own format), items.csv (id,item,label) and index.json (kind,
parameters, counts, class names, recall, build time, the checkpoint and its SHA-256). Row r of items.csv is
FAISS's vector r; its id is the item's own, kept for good: ids start at 0 and continue across `changed`
(embed.py add_to=), and a removed item's id is never given again (index.json's next_id). items.csv is safe
to open in a spreadsheet (skuvision.outputs.spreadsheet_cell) and reads back to the exact item names
(format >= 2; format 1 folders were written unescaped and are read as they are). An item added without a
label has an empty label cell (format 3).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path

import faiss
import numpy as np

from skuvision.errors import SkuvisionError
from skuvision.outputs import from_spreadsheet_cell, new_folder, taken, write_csv

log = logging.getLogger("skuvision")

KINDS = ("flat", "hnsw", "ivfpq")
DEFAULTS = {
    "flat": {},
    # FAISS's guide: M 16-64; efSearch trades speed for recall at query time.
    "hnsw": {"M": 32, "ef_construction": 80, "ef_search": 128},
    # nlist null: 4 * sqrt(n) (the guide's lower end); m null: dim / 4 sub-quantizers of nbits each.
    # refine: re-rank k * k_factor PQ candidates with vectors stored as "Flat" (exact) or "SQ8" (1 byte per
    # dimension); PQ codes alone rank near neighbours coarsely.
    "ivfpq": {"nlist": None, "m": None, "nbits": 8, "nprobe": 32, "refine": "SQ8", "k_factor": 8},
}
COMMON = {"recall_queries": 1000, "seed": 0}
NORM_TOLERANCE = 1e-3
FORMAT = 3  # 2: items.csv cells escaped for spreadsheets; 3: ids with gaps (removed items), unlabelled items


def check_normalized(vectors: np.ndarray, what: str) -> np.ndarray:
    """`vectors` as a contiguous float32 (n, d) array of unit rows, or a SkuvisionError saying what is off."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise SkuvisionError(
            f"{what}: expected a non-empty (n, d) array of vectors, got shape {vectors.shape}"
        )
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise SkuvisionError(f"{what}: contains NaN or infinite values")
    norms = np.linalg.norm(vectors, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)
    if len(bad):
        raise SkuvisionError(
            f"{what}: {len(bad)} of {len(vectors)} vectors are not L2-normalized (row {bad[0]} has norm "
            f"{norms[bad[0]]:.4g}); normalize them first, the index scores by inner product = cosine"
        )
    return vectors


def index_params(kind: str, params: dict) -> dict:
    if kind not in KINDS:
        raise SkuvisionError(f"index.kind={kind}: choose one of {', '.join(KINDS)}")
    allowed = DEFAULTS[kind] | COMMON
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise SkuvisionError(
            f"index: unknown parameter(s) {unknown} for kind={kind}; allowed: {sorted(allowed)}"
        )
    return allowed | {k: v for k, v in params.items() if v is not None or k == "refine"}


def factory_string(kind: str, dim: int, count: int, params: dict) -> str:
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{int(params['M'])}"
    nlist = int(params["nlist"] or max(1, round(4 * math.sqrt(count))))
    m = int(params["m"] or max(1, dim // 4))
    nbits = int(params["nbits"])
    if dim % m:
        raise SkuvisionError(f"index.ivfpq.m={m} must divide the embedding dimension {dim}")
    # k-means wants ~39 points per centroid; PQ's codebooks need 2**nbits points each.
    needed = max(nlist, 2**nbits)
    if count < needed:
        raise SkuvisionError(
            f"index.kind=ivfpq: {count} items are too few to train IVF{nlist},PQ{m}x{nbits} (needs at least "
            f"{needed}); use index.kind=flat, or lower index.ivfpq.nlist / index.ivfpq.nbits"
        )
    params["nlist"], params["m"] = nlist, m
    refine = params.get("refine")
    if refine not in (None, "Flat", "SQ8"):
        raise SkuvisionError(f"index.ivfpq.refine={refine}: choose null, Flat or SQ8")
    # np: no polysemous training (the factory's default for PQ), which only serves Hamming-filtered search
    # and made training ~40x slower.
    return f"IVF{nlist},PQ{m}x{nbits}np" + (f",Refine({refine})" if refine else "")


def set_search_params(index: faiss.Index, kind: str, params: dict) -> None:
    space = faiss.ParameterSpace()
    if kind == "hnsw":
        space.set_index_parameter(index, "efSearch", int(params["ef_search"]))
    elif kind == "ivfpq":
        space.set_index_parameter(index, "nprobe", int(params["nprobe"]))
        if params.get("refine"):
            space.set_index_parameter(index, "k_factor_rf", float(params["k_factor"]))


class CatalogueIndex:
    """A FAISS index over catalogue embeddings with each vector's item (file path or `split[i]`) and label."""

    def __init__(
        self,
        index: faiss.Index,
        items: list[str],
        labels: list[int | None] | None,
        class_names,
        info,
        ids: list[int] | None = None,
    ):
        self.index = index
        self.items = list(items)
        self.labels = None if labels is None else [None if v is None else int(v) for v in labels]
        self.class_names = [str(c) for c in class_names]
        self.info = info
        self.kind: str = info["kind"]
        self.dim: int = int(index.d)
        self.ids = list(range(len(self.items))) if ids is None else [int(i) for i in ids]

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(
        cls,
        features: np.ndarray,
        items,
        labels,
        class_names,
        kind: str = "flat",
        checkpoint: str | None = None,
        checkpoint_sha256: str | None = None,
        **params,
    ) -> CatalogueIndex:
        features = check_normalized(features, "index features")
        count, dim = features.shape
        items = [str(i) for i in items]
        if len(items) != count:
            raise SkuvisionError(f"index: {count} vectors but {len(items)} items")
        if labels is not None:
            labels = [int(v) for v in np.asarray(labels).reshape(-1)]
            if len(labels) == 0:
                labels = None
            elif len(labels) != count:
                raise SkuvisionError(f"index: {count} vectors but {len(labels)} labels")
        params = index_params(kind, params)
        start = time.perf_counter()
        description = factory_string(kind, dim, count, params)
        index = faiss.index_factory(dim, description, faiss.METRIC_INNER_PRODUCT)
        if kind == "hnsw":
            index.hnsw.efConstruction = int(params["ef_construction"])
        if not index.is_trained:
            index.train(features)
        index.add(features)
        set_search_params(index, kind, params)
        info = {
            "format": FORMAT,
            "kind": kind,
            "faiss": description,
            "params": params,
            "count": count,
            "dim": dim,
            "checkpoint": checkpoint,
            "checkpoint_sha256": checkpoint_sha256,
            "build_seconds": time.perf_counter() - start,
            "next_id": count,
        }
        built = cls(index, items, labels, class_names, info)
        if kind != "flat":
            built.info |= built.measure_recall(features, int(params["recall_queries"]), int(params["seed"]))
            log.info(
                "index %s: recall@10 %.4f against exact search on %d sampled items",
                description,
                built.info["recall@10"],
                built.info["recall_queries"],
            )
        log.info("index %s of %d x %d built in %.2fs", description, count, dim, info["build_seconds"])
        return built

    def measure_recall(
        self, features: np.ndarray, queries: int, seed: int, among: np.ndarray | None = None
    ) -> dict:
        """recall@10: the share of the exact 10 nearest (brute-force inner product over `features`, the
        whole catalogue in index order) that this index returns, over `queries` catalogue items drawn with
        `seed` (from the rows `among`, or from all)."""
        rng = np.random.default_rng(seed)
        rows = np.arange(len(features)) if among is None else np.asarray(among)
        sample = features[rng.choice(rows, size=min(queries, len(rows)), replace=False)]
        k = min(10, len(features))
        exact = faiss.IndexFlatIP(self.dim)
        exact.add(features)
        _, truth = exact.search(sample, k)
        _, found = self.search(sample, k)
        hits = [len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist(), strict=True)]
        return {"recall@10": float(np.sum(hits) / (k * len(sample))), "recall_queries": len(sample)}

    def changed(
        self,
        features: np.ndarray,
        remove=(),
        new_features: np.ndarray | None = None,
        new_items=(),
        new_labels=None,
        source: str | None = None,
    ) -> tuple[CatalogueIndex, np.ndarray]:
        """(a new index, its vectors in its order): this one less the items whose ids are in `remove`, plus
        the new items (ids continuing from next_id; `new_labels` None: unlabelled). `features`: this index's
        vectors in its order (embed.py's embeddings.npz). This index is left as it was.

        A flat index is made from the kept and the new vectors (it is nothing else). An approximate kind adds
        the new items to a copy of its FAISS index (HNSW keeps its graph, IVF-PQ its trained centroids and
        codebooks). Removal: HNSW cannot unlink a node, and an IVF index would keep stale row numbers, so the
        copy is emptied and refilled from the kept vectors (the HNSW graph is built anew; the IVF training
        stays). An approximate index measures its recall@10 again, over the whole catalogue and over the new
        items."""
        start = time.perf_counter()
        features = check_normalized(features, "the index's stored vectors")
        if features.shape != (len(self), self.dim):
            raise SkuvisionError(
                f"the index's stored vectors have shape {features.shape}, the index holds {len(self)} x "
                f"{self.dim}; rebuild it with embed.py"
            )
        removing = {int(i) for i in remove}
        unknown = sorted(removing - set(self.ids))
        if unknown:
            raise SkuvisionError(
                f"remove: {len(unknown)} id(s) not in the index ({', '.join(map(str, unknown[:5]))}"
                f"{', ...' if len(unknown) > 5 else ''}); its items.csv lists the ids"
            )
        keep = np.array([i not in removing for i in self.ids], dtype=bool)
        new_items = [str(i) for i in new_items]
        if new_items:
            new_features = check_normalized(new_features, "new items' vectors")
            if new_features.shape[1] != self.dim:
                raise SkuvisionError(
                    f"new items' vectors have dimension {new_features.shape[1]}, the index {self.dim} (its "
                    "index.json): embed them with the index's checkpoint"
                )
            if len(new_features) != len(new_items):
                raise SkuvisionError(f"index: {len(new_features)} new vectors but {len(new_items)} new items")
            kept = {item for item, k in zip(self.items, keep, strict=True) if k}
            seen: set[str] = set()
            for item in new_items:
                if item in kept or item in seen:
                    raise SkuvisionError(
                        f"input: {item} is already in the index"
                        + (
                            " (given twice)"
                            if item in seen
                            else "; remove its id in the same run to replace it"
                        )
                    )
                seen.add(item)
        else:
            new_features = np.zeros((0, self.dim), dtype=np.float32)
        if not keep.any() and not new_items:
            raise SkuvisionError(
                "remove: every item of the index would go, leaving it empty; embed anew instead"
            )
        params = self.info["params"]
        if self.kind == "flat":  # an exact index is its vectors: made from them, faster than a copy
            index = faiss.index_factory(self.dim, self.info["faiss"], faiss.METRIC_INNER_PRODUCT)
            index.add(features[keep])
        else:
            index = faiss.clone_index(self.index)
            if self.kind == "hnsw":
                index.hnsw.efConstruction = int(params["ef_construction"])
            if removing:
                index.reset()
                index.add(features[keep])
        if new_items:
            index.add(new_features)
        set_search_params(index, self.kind, params)
        seconds = time.perf_counter() - start
        all_features = np.concatenate([features[keep], new_features])
        next_id = int(self.info.get("next_id", len(self)))
        ids = [i for i, k in zip(self.ids, keep, strict=True) if k] + list(
            range(next_id, next_id + len(new_items))
        )
        items = [item for item, k in zip(self.items, keep, strict=True) if k] + new_items
        labels = None
        if self.labels is not None or new_labels is not None:
            old = self.labels or [None] * len(self)
            added = [None] * len(new_items) if new_labels is None else [int(v) for v in new_labels]
            labels = [label for label, k in zip(old, keep, strict=True) if k] + added
        change = {"from": source, "added": len(new_items), "removed": sorted(removing), "seconds": seconds}
        info = {k: v for k, v in self.info.items() if not k.startswith(("recall@10", "recall_queries"))}
        info |= {
            "count": len(items),
            "next_id": next_id + len(new_items),
            "changes": [*self.info.get("changes", []), change],
        }
        grown = CatalogueIndex(index, items, labels, self.class_names, info, ids)
        if self.kind != "flat":
            queries, seed = int(params["recall_queries"]), int(params["seed"])
            grown.info |= grown.measure_recall(all_features, queries, seed)
            if new_items:
                added = grown.measure_recall(
                    all_features, queries, seed, among=np.arange(keep.sum(), len(items))
                )
                grown.info |= {f"{k}_added": v for k, v in added.items()}
            log.info(
                "index %s after the change: recall@10 %.4f against exact search on %d sampled items",
                info["faiss"],
                grown.info["recall@10"],
                grown.info["recall_queries"],
            )
        counts = (len(new_items), len(removing), len(items))
        log.info("index %s: %d added, %d removed, %d items, in %.2fs", info["faiss"], *counts, seconds)
        return grown, all_features

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, indices), each (m, k), best first. An approximate index that finds fewer than k items for
        a query searches those queries again exhaustively; it never returns the -1 padding of FAISS."""
        queries = check_normalized(queries, "index queries")
        if queries.shape[1] != self.dim:
            raise SkuvisionError(f"index queries have dimension {queries.shape[1]}, the index {self.dim}")
        if not 1 <= k <= len(self):
            raise SkuvisionError(f"k={k}: the index holds {len(self)} items; choose 1 <= k <= {len(self)}")
        scores, indices = self.index.search(queries, k)
        short = np.flatnonzero((indices < 0).any(axis=1))
        if len(short):
            log.info("%d queries found fewer than %d items; searching them exhaustively", len(short), k)
            scores[short], indices[short] = self.exhaustive_search(queries[short], k)
            if (indices < 0).any():
                raise SkuvisionError(
                    f"index {self.info['faiss']}: found fewer than k={k} items even exhaustively; rebuild it"
                )
        return scores, indices

    def exhaustive_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        space = faiss.ParameterSpace()
        if self.kind == "ivfpq":
            space.set_index_parameter(self.index, "nprobe", int(faiss.extract_index_ivf(self.index).nlist))
        elif self.kind == "hnsw":
            space.set_index_parameter(self.index, "efSearch", max(len(self), k))
        try:
            return self.index.search(queries, k)
        finally:
            set_search_params(self.index, self.kind, self.info["params"])

    def save(self, folder) -> None:
        """A new folder (or an empty one), written whole or not at all."""
        folder = Path(folder)
        if taken(folder):
            raise SkuvisionError(
                f"{folder}: already holds an index (or other files): nothing was written; choose another "
                "folder, or remove it"
            )
        with new_folder(folder) as partial:
            faiss.write_index(self.index, str(partial / "index.faiss"))
            labels = [None] * len(self.items) if self.labels is None else self.labels
            labels = ["" if label is None else label for label in labels]
            rows = zip(self.ids, self.items, labels, strict=True)
            write_csv(partial / "items.csv", ["id", "item", "label"], rows)
            meta = self.info | {"format": FORMAT, "class_names": self.class_names}
            (partial / "index.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder) -> CatalogueIndex:
        folder = Path(folder)
        files = [folder / name for name in ("index.faiss", "items.csv", "index.json")]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise SkuvisionError(
                f"{folder}: not a catalogue index (missing {', '.join(missing)}); build one with embed.py"
            )
        try:
            meta = json.loads(files[2].read_text())
            kind, count, params = meta["kind"], int(meta["count"]), meta["params"]
            class_names = meta["class_names"]
            written_format = int(meta.get("format", 1))
        except (ValueError, KeyError, TypeError) as err:
            raise SkuvisionError(
                f"{files[2]}: unreadable index description ({err}); rebuild the index"
            ) from err
        if written_format > FORMAT:
            raise SkuvisionError(
                f"{files[2]}: index format {written_format} is newer than this skuvision reads ({FORMAT}); "
                "upgrade skuvision or rebuild the index"
            )
        if kind not in KINDS:
            raise SkuvisionError(f"{files[2]}: unknown index kind {kind!r}; rebuild the index")
        try:
            index = faiss.read_index(str(files[0]))
        except RuntimeError as err:  # FAISS raises RuntimeError with a C++ trace for a damaged file
            raise SkuvisionError(f"{files[0]}: not a readable FAISS index; rebuild the index") from err
        try:
            with open(files[1], newline="") as f:
                rows = list(csv.DictReader(f))
            ids = [int(r["id"]) for r in rows]
            items = [r["item"] for r in rows]
            if written_format >= 2:
                items = [from_spreadsheet_cell(item) for item in items]
            labels = [None if r["label"] == "" else int(r["label"]) for r in rows]
            labels = None if all(label is None for label in labels) else labels
            next_id = int(meta.get("next_id", len(rows)))
        except (ValueError, KeyError, TypeError) as err:
            raise SkuvisionError(f"{files[1]}: unreadable item list ({err}); rebuild the index") from err
        if written_format < 3 and ids != list(range(len(rows))):
            raise SkuvisionError(f"{files[1]}: ids are not 0..{len(rows) - 1} in order; rebuild the index")
        if np.any(np.diff(ids) <= 0) or (ids and not 0 <= ids[0] <= ids[-1] < next_id):
            raise SkuvisionError(
                f"{files[1]}: ids are not increasing from 0 below index.json's next_id {next_id}; rebuild "
                "the index"
            )
        if not index.ntotal == len(items) == count:
            raise SkuvisionError(
                f"{folder}: counts disagree (index.faiss {index.ntotal}, items.csv {len(items)}, index.json "
                f"{count}); rebuild the index"
            )
        if index.d != int(meta.get("dim", index.d)):
            raise SkuvisionError(f"{folder}: index.faiss has dimension {index.d}, index.json {meta['dim']}")
        set_search_params(index, kind, params)
        info = {k: v for k, v in meta.items() if k != "class_names"} | {"next_id": next_id}
        return cls(index, items, labels, class_names, info, ids)
