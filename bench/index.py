"""make bench rows for the catalogue index: recall@10 and queries/s of the approximate kinds (HNSW, IVF-PQ)
against exact search (FAISS Flat, i.e. brute-force inner product), all measured in the same call.

Data: generated clustered embeddings (real embeddings are clustered, not uniform noise): products in groups
(clusters) whose members vary along a few directions of their own, plus noise, L2-normalized. Queries are new
draws from the same clusters, not catalogue items. Threads are fixed (BENCH_THREADS, default 2).

Alone: python -m bench.index [--quick]
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
from torch.utils import benchmark

from bench import THREADS
from bench.table import run_section
from skuvision.index import CatalogueIndex

DIM = 256
K = 10


def clustered(n: int, queries: int, dim: int = DIM, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(catalogue, queries): n // 100 clusters of random centres; each member = centre + a point of the
    cluster's own 16-dimensional subspace + isotropic noise; rows L2-normalized."""
    rng = np.random.default_rng(seed)
    clusters, rank = max(10, n // 100), 16
    centres = rng.normal(size=(clusters, dim))
    # Per dimension: centre variance 1, the cluster's own directions 16 / 64, noise 0.09: members of a
    # cluster have cosine ~0.75, of different clusters ~0.
    bases = rng.normal(size=(clusters, dim, rank)) / 8
    assign = rng.integers(0, clusters, size=n + queries)
    x = centres[assign] + 0.3 * rng.normal(size=(n + queries, dim))
    z = rng.normal(size=(n + queries, rank))
    for c in range(clusters):
        members = np.flatnonzero(assign == c)
        x[members] += z[members] @ bases[c].T
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x.astype(np.float32)
    return x[:n], x[n:]


def exact_neighbours(catalogue: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The reference: FAISS's exact inner-product search (brute force)."""
    flat = faiss.IndexFlatIP(catalogue.shape[1])
    flat.add(catalogue)
    return flat.search(queries, k)[1]


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth, strict=True)]))


def queries_per_second(
    index: CatalogueIndex, queries: np.ndarray, one_at_a_time: bool, repeats: int
) -> float:
    """Mean of `repeats` runs: all queries in one batch, or one call per query (as a server answers)."""

    def search():
        if one_at_a_time:
            for i in range(len(queries)):
                index.search(queries[i : i + 1], K)
        else:
            index.search(queries, K)

    timer = benchmark.Timer("search()", globals={"search": search}, num_threads=THREADS)
    return len(queries) / timer.timeit(repeats).median


def index_bytes(index: CatalogueIndex) -> int:
    return len(faiss.serialize_index(index.index))


def bench_rows(workdir: Path, quick: bool = False) -> tuple[list[tuple], list[str]]:
    faiss.omp_set_num_threads(THREADS)
    n, nq = (10_000, 200) if quick else (100_000, 1000)
    repeats = 3
    catalogue, queries = clustered(n, nq)
    items = [f"generated[{i}]" for i in range(n)]
    truth = exact_neighbours(catalogue, queries, K)

    exact = CatalogueIndex.build(catalogue, items, None, [], kind="flat")
    np.testing.assert_array_equal(
        exact.search(queries, K)[1], truth
    )  # the index's flat kind is the reference
    exact_batch = queries_per_second(exact, queries, one_at_a_time=False, repeats=repeats)
    exact_single = queries_per_second(exact, queries, one_at_a_time=True, repeats=repeats)
    exact_bytes = index_bytes(exact)

    rows, notes = [], []
    label = f"{n // 1000}k x {DIM}, clustered"
    for kind in ("hnsw", "ivfpq"):
        index = CatalogueIndex.build(catalogue, items, None, [], kind=kind)  # the shipped defaults
        index.save(workdir / f"index-{kind}")  # what embed.py writes; loaded back for the measurement
        index = CatalogueIndex.load(workdir / f"index-{kind}")
        recall = recall_at(index.search(queries, K)[1], truth)
        batch = queries_per_second(index, queries, one_at_a_time=False, repeats=repeats)
        single = queries_per_second(index, queries, one_at_a_time=True, repeats=repeats)
        name = index.info["faiss"]
        rows += [
            (
                f"{name} recall@10 ({label}, new queries)",
                f"{recall:.4f}",
                "1.0000 (exact Flat)",
                f"{recall:.3f}",
                ">= 0.95",
            ),
            (
                f"{name} queries/s, one per call ({label})",
                f"{single:.0f}",
                f"{exact_single:.0f} (exact Flat = brute force)",
                f"{single / exact_single:.1f}x",
                "> 1x",
            ),
            (
                f"{name} queries/s, batch of {nq} ({label})",
                f"{batch:.0f}",
                f"{exact_batch:.0f} (exact Flat = brute force)",
                f"{batch / exact_batch:.1f}x",
                "",
            ),
        ]
        info = index.info
        if info["params"].get("refine"):  # the same IVF-PQ without its re-ranking step: PQ codes alone
            pq_only = recall_at(index.index.base_index.search(queries, K)[1], truth)
            notes.append(
                f"{name}: PQ codes alone (its base index, no re-ranking) reach recall@10 {pq_only:.4f}."
            )
        notes.append(
            f"{name}: built in {info['build_seconds']:.1f} s, {index_bytes(index) / n:.0f} bytes per item "
            f"(exact Flat {exact_bytes / n:.0f}); recall@10 measured at build time on "
            f"{info['recall_queries']} catalogue items: {info['recall@10']:.4f}; parameters {info['params']}."
        )
    notes.append(
        f"Index rows: {n} generated vectors in {max(10, n // 100)} clusters, {nq} new queries from the same "
        f"clusters, k={K}, FAISS {faiss.__version__}, {THREADS} threads; queries/s is the median of "
        f"{repeats} runs. Recall is against FAISS's exact inner-product search (brute force), which the test "
        "suite checks against numpy."
    )
    return rows, notes


def main() -> None:
    run_section(bench_rows, __doc__.splitlines()[0], "10k vectors instead of 100k")


if __name__ == "__main__":
    main()
