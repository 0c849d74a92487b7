"""Exact duplicates (the same decoded pixels, found by cleanvision's hash) and near duplicates (cosine of
descriptors at or over a threshold, found through the FAISS catalogue index), within and across splits.

Descriptors are centered on the catalogue's mean before the cosine: what every image shares (a dark
background, the features of its class) then stops counting as likeness. A mirrored copy is found by querying
the index with each image's mirror-image descriptor as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA

from skuvision.audit.catalogue import Catalogue
from skuvision.index import CatalogueIndex

EVALUATION_SPLITS = ("val", "test")


@dataclass
class Pair:
    a: int
    b: int
    kind: str  # exact or near
    similarity: float
    mirrored: bool  # found through the mirror image of one of them


def exact_pairs(groups: list[list[int]], catalogue: Catalogue) -> list[Pair]:
    """Each group (images with the same pixels) as pairs with one anchor: a training image when the group
    has one, so every leaked evaluation image is paired with the training image it copies."""
    pairs = []
    for group in groups:
        train = [i for i in group if catalogue.splits[i] == "train"]
        anchor = train[0] if train else group[0]
        pairs += [Pair(anchor, i, "exact", 1.0, False) for i in group if i != anchor]
    return pairs


def centered(catalogue: Catalogue, max_dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors and mirror-image descriptors, centered on the catalogue mean (and, over max_dim
    dimensions, projected onto the catalogue's principal components), L2-normalized."""
    plain, mirrored = catalogue.descriptors, catalogue.mirrored
    if plain.shape[1] > max_dim and len(plain) > max_dim:
        pca = PCA(n_components=max_dim, svd_solver="randomized", random_state=seed).fit(plain)
        plain, mirrored = pca.transform(plain), pca.transform(mirrored)  # centered by the PCA's mean
    else:
        mean = plain.mean(axis=0)
        plain, mirrored = plain - mean, mirrored - mean
    return normalized(plain), normalized(mirrored)


def normalized(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), np.float32)


def near_pairs(
    catalogue: Catalogue, class_names: list[str], threshold: float, k: int, mirrored: bool, max_dim: int,
    seed: int,
) -> list[Pair]:  # fmt: skip
    """Pairs whose descriptor cosine is >= threshold among each image's k nearest neighbours; with
    `mirrored`, the mirror image of each image queries the index too and a pair keeps its best score."""
    plain, flipped = centered(catalogue, max_dim, seed)
    index = CatalogueIndex.build(plain, catalogue.items, catalogue.labels.tolist(), class_names, kind="flat")
    n = len(catalogue)
    queries = np.concatenate([plain, flipped]) if mirrored else plain
    scores, neighbours = index.search(queries, min(k + 1, n))  # +1: an image finds itself first
    best: dict[tuple[int, int], tuple[float, bool]] = {}
    for row, (row_scores, row_neighbours) in enumerate(zip(scores, neighbours, strict=True)):
        query, via_mirror = row % n, row >= n
        for score, other in zip(row_scores.tolist(), row_neighbours.tolist(), strict=True):
            if other < 0 or other == query or score < threshold:
                continue
            key = (min(query, other), max(query, other))
            if key not in best or score > best[key][0]:
                best[key] = (score, via_mirror)
    return [Pair(a, b, "near", s, m) for (a, b), (s, m) in best.items()]


def is_leakage(pair: Pair, catalogue: Catalogue) -> bool:
    """A val or test image that duplicates a training image."""
    splits = {catalogue.splits[pair.a], catalogue.splits[pair.b]}
    return "train" in splits and bool(splits & set(EVALUATION_SPLITS))


def find_duplicates(
    catalogue: Catalogue, exact_groups: list[list[int]], class_names: list[str], threshold: float, k: int,
    mirrored: bool, max_dim: int = 1024, seed: int = 0,
) -> list[Pair]:  # fmt: skip
    """Exact pairs, then near pairs that are not already exact, most similar first."""
    exact = exact_pairs(exact_groups, catalogue)
    same_pixels = {}
    for g, group in enumerate(exact_groups):
        for i in group:
            same_pixels[i] = g
    near = [
        p
        for p in near_pairs(catalogue, class_names, threshold, k, mirrored, max_dim, seed)
        if p.a not in same_pixels or same_pixels.get(p.a) != same_pixels.get(p.b)
    ]
    near.sort(key=lambda p: -p.similarity)
    return exact + near
