"""Levels of one taxonomy among a table's label columns: a column is a coarser level of another when, in
the training rows, each value of the finer column comes with one value of the coarser (every articleType has
one masterCategory). The coarser level is then read off the finer head (skuvision.models.heads), so the model
cannot predict a masterCategory its articleType contradicts.

Chance must not pass for a hierarchy: each finer class needs `min_support` rows naming both columns, and the
coarser column must have fewer classes. A coarser column hangs off the finest column it is a function of.
"""

from __future__ import annotations

import pandas as pd

MIN_SUPPORT = 3  # rows per finer class; with fewer, independent columns often look like a hierarchy


def parent_map(fine: pd.Series, coarse: pd.Series, min_support: int = MIN_SUPPORT) -> dict[str, str] | None:
    """{fine value: its one coarse value} when `coarse` is a function of `fine` on the rows naming both,
    with every fine value seen `min_support` times and fewer coarse values than fine; else None."""
    both = (fine != "") & (coarse != "")
    pairs = pd.DataFrame({"fine": fine[both], "coarse": coarse[both]})
    if pairs.empty:
        return None
    per_fine = pairs.groupby("fine")["coarse"].agg(["nunique", "size", "first"])
    if (per_fine["nunique"] > 1).any() or (per_fine["size"] < min_support).any():
        return None
    if pairs["coarse"].nunique() >= len(per_fine):
        return None
    return per_fine["first"].to_dict()


def find_taxonomy(table: pd.DataFrame, columns: list[str]) -> dict[str, tuple[str, dict[str, str]]]:
    """{coarse column: (the finest column it is read off, {fine value: coarse value})} over `table`'s
    training rows."""
    sizes = {c: table[c][table[c] != ""].nunique() for c in columns}
    found = {}
    for coarse in columns:
        finer = sorted((c for c in columns if c != coarse), key=lambda c: -sizes[c])
        for fine in finer:
            mapping = parent_map(table[fine], table[coarse])
            if mapping is not None:
                found[coarse] = (fine, mapping)
                break
    return found
