"""make bench rows for changing a catalogue index in place of rebuilding it (embed.py add_to=, remove=):
seconds to add N items to a copy of an existing index (CatalogueIndex.changed) against building the grown
catalogue's index from scratch, and recall@10 after the add (HNSW, IVF-PQ) against exact search and against
the rebuilt index, all measured in the same call.

Data: bench.index's generated clustered embeddings. The new items come either from the catalogue's own
clusters (new products of known kinds) or from clusters the catalogue has none of (a new kind of product:
an IVF index's centroids were trained without them). Embedding the new images is left out on both sides:
embed.py add_to= embeds only the new images, a rebuild embeds them all (the bigger saving, not counted here).
An exact (flat) index is left out: a change makes it from the stored vectors, which is what a rebuild does.

Alone: python -m bench.index_changes [--quick]
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from bench import THREADS
from bench.index import K, clustered, exact_neighbours, recall_at
from bench.table import run_section
from skuvision.index import CatalogueIndex


def built(features: np.ndarray, kind: str) -> tuple[CatalogueIndex, float]:
    """The index of `features` with the shipped defaults, and its build seconds (training and adding; its
    recall measurement left out, as `changed`'s seconds leave it out)."""
    index = CatalogueIndex.build(features, [f"item[{i}]" for i in range(len(features))], None, [], kind=kind)
    return index, index.info["build_seconds"]


def bench_rows(workdir: Path, quick: bool = False) -> tuple[list[tuple], list[str]]:
    faiss.omp_set_num_threads(THREADS)
    n, added, nq = (5_000, 100, 200) if quick else (100_000, 1000, 1000)
    known, queries = clustered(n + added, nq)
    catalogue, same = known[:n], known[n:]
    unseen, unseen_queries = clustered(added, nq, seed=1)  # other cluster centres
    label = f"{n // 1000}k x {catalogue.shape[1]}, clustered"
    rows, notes = [], []
    for kind in ("hnsw", "ivfpq"):  # flat: a change makes the index from the vectors, as a rebuild does
        index, _ = built(catalogue, kind)
        for where, new, new_queries in (("same", same, queries), ("new", unseen, unseen_queries)):
            grown, features = index.changed(catalogue, (), new, [f"new[{i}]" for i in range(added)])
            add_seconds = grown.info["changes"][-1]["seconds"]
            rebuilt, rebuild_seconds = built(features, kind)
            name = grown.info["faiss"]
            clusters = "their own clusters" if where == "same" else "clusters new to the index"
            if where == "same":
                rows.append(
                    (
                        f"{name}: add {added} items to an index of {label} ({clusters}), seconds",
                        f"{add_seconds:.3f}",
                        f"{rebuild_seconds:.3f} (rebuilt from all {n + added} vectors)",
                        f"{rebuild_seconds / add_seconds:.0f}x",
                        "faster than a rebuild",
                    )
                )
            both = np.concatenate([queries, new_queries])
            truth = exact_neighbours(features, both, K)
            after = recall_at(grown.search(both, K)[1], truth)
            fresh = recall_at(rebuilt.search(both, K)[1], truth)
            rows.append(
                (
                    f"{name}: recall@10 after adding {added} items from {clusters} (new queries)",
                    f"{after:.4f}",
                    f"{fresh:.4f} rebuilt; 1.0000 exact Flat",
                    f"{after - fresh:+.4f}",
                    ">= 0.95, within 0.01 of a rebuild",
                )
            )
            notes.append(
                f"{name} after adding {added} from {clusters}: recall@10 as index.json reports it "
                f"{grown.info['recall@10']:.4f} over {grown.info['recall_queries']} catalogue items, "
                f"{grown.info['recall@10_added']:.4f} over the new items."
            )
        removed = range(0, n, n // added)[:added]
        shrunk, features = index.changed(catalogue, removed)
        remove_seconds = shrunk.info["changes"][-1]["seconds"]
        _, rebuild_seconds = built(features, kind)
        rows.append(
            (
                f"{shrunk.info['faiss']}: remove {added} items (refilled from the kept vectors), seconds",
                f"{remove_seconds:.3f}",
                f"{rebuild_seconds:.3f} (rebuilt from the {n - added} kept vectors)",
                f"{rebuild_seconds / remove_seconds:.1f}x",
                "",
            )
        )
    notes.append(
        f"Index change rows: {n} generated vectors in {max(10, n // 100)} clusters, {added} added, {nq} new "
        f"queries from the catalogue's clusters plus {nq} from the new ones, k={K}, FAISS "
        f"{faiss.__version__}, {THREADS} threads, one run each (wall clock). Seconds are what the index "
        "records (build_seconds, a change's seconds): both leave out the recall measurement; a change "
        "includes copying the index."
    )
    return rows, notes


def main() -> None:
    run_section(bench_rows, __doc__.splitlines()[0], "5k vectors instead of 100k")


if __name__ == "__main__":
    main()
