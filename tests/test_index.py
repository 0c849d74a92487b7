"""CatalogueIndex (FAISS): exact search against brute force, save/load, recall of approximate kinds, refusals;
and the index embed.py writes."""

import csv
import json

import numpy as np
import pandas as pd
import pytest

from skuvision.errors import SkuvisionError
from skuvision.index import CatalogueIndex
from skuvision.tasks.embed import embed
from skuvision.tasks.train import train
from tests.helpers import compose_cfg, quick_overrides
from tests.writers import write_image_folder

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

# Small enough to train quickly, big enough for the IVF lists and PQ codebooks (2**nbits points).
APPROXIMATE = {
    "hnsw": {"M": 16, "ef_construction": 40, "ef_search": 64},
    "ivfpq": {"nlist": 16, "m": 8, "nbits": 6, "nprobe": 4, "refine": "Flat", "k_factor": 4},
}


def unit_rows(n: int, d: int, seed: int, clusters: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    if clusters:
        x = 0.4 * x + 2 * rng.normal(size=(clusters, d))[rng.integers(0, clusters, n)]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(queries: np.ndarray, catalogue: np.ndarray, k: int):
    sims = queries.astype(np.float64) @ catalogue.astype(np.float64).T
    order = np.argsort(-sims, axis=1)[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def items_of(n: int) -> list[str]:
    return [f"test[{i}]" for i in range(n)]


def test_exact_search_matches_brute_force():
    catalogue, queries = unit_rows(3000, 48, seed=0), unit_rows(200, 48, seed=1)
    index = CatalogueIndex.build(catalogue, items_of(3000), None, [], kind="flat")
    scores, indices = index.search(queries, 10)
    want_scores, want_indices = brute_force(queries, catalogue, 10)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert index.kind == "flat" and index.dim == 48 and "recall@10" not in index.info


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_save_load_round_trip(kind, tmp_path):
    catalogue = unit_rows(2000, 32, seed=2, clusters=20)
    labels = np.arange(2000) % 5
    index = CatalogueIndex.build(
        catalogue, items_of(2000), labels, list("abcde"), kind=kind, **APPROXIMATE.get(kind, {})
    )
    index.save(tmp_path / "index")
    loaded = CatalogueIndex.load(tmp_path / "index")
    queries = catalogue[:100]
    for got, want in zip(loaded.search(queries, 7), index.search(queries, 7), strict=True):
        np.testing.assert_array_equal(got, want)
    assert loaded.items == index.items and loaded.labels == labels.tolist()
    assert loaded.class_names == list("abcde") and loaded.kind == kind and loaded.info == index.info
    with open(tmp_path / "index" / "items.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[3] == {"id": "3", "item": "test[3]", "label": "3"}
    with pytest.raises(SkuvisionError, match="already holds an index"):
        index.save(tmp_path / "index")  # an earlier index is never overwritten


# Item names a spreadsheet would run as formulas, one starting with the escape quote, and awkward ones.
TRICKY_ITEMS = [
    '=HYPERLINK("http://example.com","x").png', "+SUM(1,2).png", "-x.png", "@x.png", "\tx.png", "\rx.png",
    "'quoted.png", "''.png", "-1.5", 'a, "b"\nc.png', "čaj ☕ 茶.png", "plain.png",
]  # fmt: skip


def test_items_csv_is_safe_in_a_spreadsheet_and_reads_back_exactly(tmp_path):
    catalogue = unit_rows(len(TRICKY_ITEMS), 8, seed=3)
    CatalogueIndex.build(catalogue, TRICKY_ITEMS, None, []).save(tmp_path / "index")
    assert CatalogueIndex.load(tmp_path / "index").items == TRICKY_ITEMS
    with open(tmp_path / "index" / "items.csv", newline="") as f:
        cells = [row["item"] for row in csv.DictReader(f)]
    assert cells == ["'" + item for item in TRICKY_ITEMS[:8]] + TRICKY_ITEMS[8:]  # "-1.5" is a number
    assert pd.read_csv(tmp_path / "index" / "items.csv", keep_default_na=False)["item"].tolist() == cells


def test_an_index_written_before_the_quoting_reads_as_it_was(tmp_path):
    """Format 1 folders hold item names unquoted: a name that starts with a quote keeps it."""
    catalogue = unit_rows(3, 8, seed=4)
    CatalogueIndex.build(catalogue, ["a.png", "b.png", "c.png"], None, []).save(tmp_path / "index")
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    (tmp_path / "index" / "index.json").write_text(json.dumps(meta | {"format": 1}))
    (tmp_path / "index" / "items.csv").write_text("id,item,label\n0,'a.png,\n1,=b.png,\n2,c.png,\n")
    assert CatalogueIndex.load(tmp_path / "index").items == ["'a.png", "=b.png", "c.png"]
    (tmp_path / "index" / "index.json").write_text(json.dumps(meta | {"format": 99}))
    with pytest.raises(SkuvisionError, match="index format 99 is newer"):
        CatalogueIndex.load(tmp_path / "index")


def test_an_earlier_index_folder_is_kept_whole(tmp_path):
    """A folder holding anything is refused, and a save that fails leaves no folder under the name."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep")
    index = CatalogueIndex.build(unit_rows(5, 8, seed=5), items_of(5), None, [])
    with pytest.raises(SkuvisionError, match="nothing was written"):
        index.save(tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    index.labels = [0, 1]  # inconsistent: the save fails half-way through
    with pytest.raises((ValueError, IndexError)):
        index.save(tmp_path / "broken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_index_reports_its_recall(kind, caplog):
    """With every item as a query, the reported recall@10 is the one brute force gives for its results."""
    catalogue = unit_rows(2000, 32, seed=3, clusters=20)
    params = APPROXIMATE[kind] | {"refine": None, "nprobe": 1} if kind == "ivfpq" else APPROXIMATE[kind]
    with caplog.at_level("INFO", logger="skuvision"):
        index = CatalogueIndex.build(
            catalogue, items_of(2000), None, [], kind=kind, recall_queries=2000, **params
        )
    _, truth = brute_force(catalogue, catalogue, 10)
    _, found = index.search(catalogue, 10)
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth.tolist(), found.tolist(), strict=True)])
    assert index.info["recall@10"] == pytest.approx(recall, abs=1e-3)
    assert index.info["recall_queries"] == 2000
    assert f"recall@10 {index.info['recall@10']:.4f}" in caplog.text
    if kind == "ivfpq":  # PQ codes alone, one list probed: clearly approximate, and measured as such
        assert index.info["recall@10"] < 0.95


def test_ivfpq_never_returns_padding():
    """One list probed holds fewer than k items for some queries: those are searched again, not padded."""
    catalogue = unit_rows(600, 16, seed=4, clusters=30)
    index = CatalogueIndex.build(
        catalogue, items_of(600), None, [], kind="ivfpq", nlist=60, m=4, nbits=4, nprobe=1, refine=None
    )
    scores, indices = index.search(catalogue[:50], 40)
    assert (indices >= 0).all() and np.isfinite(scores).all()
    assert all(len(set(row)) == 40 for row in indices.tolist())


def test_refuses_bad_input():
    catalogue = unit_rows(300, 8, seed=5)
    with pytest.raises(SkuvisionError, match="not L2-normalized"):
        CatalogueIndex.build(catalogue * 2, items_of(300), None, [])
    with pytest.raises(SkuvisionError, match="300 vectors but 299 items"):
        CatalogueIndex.build(catalogue, items_of(299), None, [])
    with pytest.raises(SkuvisionError, match="index.kind=annoy"):
        CatalogueIndex.build(catalogue, items_of(300), None, [], kind="annoy")
    with pytest.raises(SkuvisionError, match="too few to train"):  # PQ codebooks of 2**8 centroids
        CatalogueIndex.build(catalogue[:200], items_of(200), None, [], kind="ivfpq")
    index = CatalogueIndex.build(catalogue, items_of(300), None, [])
    with pytest.raises(SkuvisionError, match="k=301"):
        index.search(catalogue[:2], 301)
    with pytest.raises(SkuvisionError, match="dimension 4"):
        index.search(unit_rows(2, 4, seed=6), 3)


def corrupt_index(folder, how: str) -> None:
    if how == "missing items.csv":
        (folder / "items.csv").unlink()
    elif how == "truncated index.faiss":
        data = (folder / "index.faiss").read_bytes()
        (folder / "index.faiss").write_bytes(data[: len(data) // 2])
    elif how == "garbage index.faiss":
        (folder / "index.faiss").write_bytes(b"not an index" * 10)
    elif how == "one item fewer":
        lines = (folder / "items.csv").read_text().splitlines()
        (folder / "items.csv").write_text("\n".join(lines[:-1]) + "\n")
    elif how == "bad index.json":
        (folder / "index.json").write_text("{")
    elif how == "count mismatch in index.json":
        meta = json.loads((folder / "index.json").read_text())
        (folder / "index.json").write_text(json.dumps(meta | {"count": meta["count"] + 1}))


@pytest.mark.parametrize(
    "how",
    [
        "missing items.csv",
        "truncated index.faiss",
        "garbage index.faiss",
        "one item fewer",
        "bad index.json",
        "count mismatch in index.json",
    ],
)
def test_load_refuses_a_corrupt_folder(how, tmp_path):
    catalogue = unit_rows(50, 8, seed=7)
    CatalogueIndex.build(catalogue, items_of(50), np.zeros(50), ["x"]).save(tmp_path / "index")
    corrupt_index(tmp_path / "index", how)
    with pytest.raises(SkuvisionError) as raised:
        CatalogueIndex.load(tmp_path / "index")
    message = str(raised.value)
    assert "\n" not in message and str(tmp_path / "index") in message


def test_load_refuses_a_missing_folder(tmp_path):
    with pytest.raises(SkuvisionError, match="not a catalogue index"):
        CatalogueIndex.load(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("shop")
    write_image_folder(root, classes=("kettle", "phone", "shirt"), per_class=9, size=36, presplit=True)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shop):
    run = tmp_path_factory.mktemp("train")
    overrides = quick_overrides("image_folder", run) + [
        f"data.root={shop}",
        "trainer.max_epochs=1",
        "test=false",
        "trainer.precision=32",
    ]
    train(compose_cfg("train", overrides, run / "run"))
    return sorted((run / "run" / "checkpoints").glob("*.ckpt"))[0]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_embed_writes_an_index_of_the_split_files(kind, checkpoint, shop, tmp_path):
    overrides = [
        f"ckpt_path={checkpoint}",
        "data=image_folder",
        f"data.root={shop}",
        "data.num_workers=0",
        "num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
        "split=train",
        "k=4",
        f"index.kind={kind}",
    ]
    result = embed(compose_cfg("embed", overrides, tmp_path / "run"))
    index = CatalogueIndex.load(tmp_path / "run" / "index")
    files = sorted(str(p) for p in (shop / "train").rglob("*.*"))
    assert sorted(index.items) == files and len(index) == 27 and result["index_info"] == index.info
    assert index.class_names == ["kettle", "phone", "shirt"]
    assert [index.class_names[label] for label in index.labels] == [p.split("/")[-2] for p in index.items]
    assert index.info["checkpoint"] == str(checkpoint) and (kind == "flat") == ("recall@10" not in index.info)
    saved = np.load(tmp_path / "run" / "embeddings.npz")
    assert saved["items"].tolist() == index.items
    # neighbours.csv: each item's 4 nearest other items, as brute force finds them (compared by cosine: the
    # barely trained model maps some images alike, and tied items may come in either order)
    features = saved["features"].astype(np.float64)
    sims = features @ features.T
    np.fill_diagonal(sims, -np.inf)
    with open(tmp_path / "run" / "neighbours.csv") as f:
        rows = list(csv.DictReader(f))
    position = {item: i for i, item in enumerate(index.items)}
    for i, item in enumerate(index.items):
        found = [(position[r["item"]], float(r["cosine"])) for r in rows if r["query"] == item]
        assert len(found) == 4 and i not in [j for j, _ in found]
        np.testing.assert_allclose([c for _, c in found], np.sort(sims[i])[::-1][:4], atol=1e-5)
        np.testing.assert_allclose([c for _, c in found], [sims[i, j] for j, _ in found], atol=1e-5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("index.kind=annoy", "index.kind=annoy: choose one of"),
        ("+index.hnsw.ef=3", r"unknown parameter\(s\) \['ef'\]"),
    ],
)
def test_embed_checks_the_index_config_before_embedding(override, message, checkpoint, shop, tmp_path):
    overrides = [
        f"ckpt_path={checkpoint}",
        "data=image_folder",
        f"data.root={shop}",
        "index.kind=hnsw",
        override,
    ]
    with pytest.raises(SkuvisionError, match=message):
        embed(compose_cfg("embed", overrides, tmp_path / "run"))
    assert not (tmp_path / "run" / "embeddings.npz").exists()
