"""embed.py add_to=: new items into a copy of an earlier index and items out of it, in a new run folder; the
earlier folder byte for byte as it was; the refusals; serve on the grown index."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skuvision.errors import SkuvisionError
from skuvision.index import CatalogueIndex
from skuvision.tasks.embed import embed
from tests.helpers import compose_cfg

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

HNSW = ["index.kind=hnsw", "index.hnsw.ef_search=256", "index.recall_queries=200"]  # ef >= items: exact


def folder_digest(folder: Path) -> dict[str, str]:
    """Every file below `folder` (links included, by their target's name) and its SHA-256."""
    return {
        str(p.relative_to(folder)): (
            "link:" + str(p.readlink()) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


def embed_cfg(run: Path, *overrides: str):
    common = ["num_workers=0", "trainer.accelerator=cpu", "trainer.precision=32", "k=3", "batch_size=16"]
    return compose_cfg("embed", common + list(overrides), run)


@pytest.fixture(scope="module")
def new_photos(tmp_path_factory) -> Path:
    """Products the catalogue does not hold: real photos (scikit-image's samples) and vertical bars in
    colours, where the catalogue has grey horizontal bars; PNG and JPEG."""
    from skimage import data

    root = tmp_path_factory.mktemp("new")
    photos = {
        "cat": data.chelsea(),
        "coffee": data.coffee(),
        "astronaut": data.astronaut(),
        "rocket": data.rocket(),
    }
    for k, (name, pixels) in enumerate(photos.items()):
        img = Image.fromarray(pixels).resize((40, 40))
        img.save(root / f"{name}.{'png' if k % 2 else 'jpg'}")
    rng = np.random.default_rng(7)
    for k, colour in enumerate([(230, 40, 40), (40, 40, 230)]):
        pixels = rng.integers(0, 60, size=(40, 40, 3), dtype=np.uint8)
        pixels[:, 8 + 16 * k : 20 + 16 * k] = colour
        Image.fromarray(pixels).save(root / f"bar_{k}.png")
    return root


@pytest.fixture(scope="module")
def hnsw_run(serve_checkpoint, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("embed_hnsw") / "run"
    embed(embed_cfg(run, f"ckpt_path={serve_checkpoint}", "split=train", *HNSW))
    return run


def searched(index: CatalogueIndex, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores, rows = index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
    return scores, np.array(index.ids)[rows]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_added_items_are_found_and_the_earlier_run_is_untouched(kind, request, new_photos, tmp_path):
    earlier = request.getfixturevalue("catalogue_index" if kind == "flat" else "hnsw_run")
    before = folder_digest(earlier)
    old = CatalogueIndex.load(earlier / "index")
    old_saved = np.load(earlier / "embeddings.npz")
    result = embed(embed_cfg(tmp_path / "run", f"add_to={earlier}", f"input={new_photos}"))
    assert folder_digest(earlier) == before  # the earlier run folder, byte for byte
    grown = CatalogueIndex.load(tmp_path / "run" / "index")
    saved = np.load(tmp_path / "run" / "embeddings.npz")
    new_files = sorted(str(p) for p in new_photos.rglob("*.*"))
    n_old, n_new = len(old), len(new_files)
    assert grown.kind == kind and len(grown) == n_old + n_new
    assert grown.items == old.items + new_files and saved["items"].tolist() == grown.items
    assert grown.ids == list(range(n_old + n_new)) and result["added_ids"] == list(
        range(n_old, n_old + n_new)
    )
    assert grown.info["checkpoint_sha256"] == old.info["checkpoint_sha256"]
    assert grown.labels[:n_old] == old.labels and grown.labels[n_old:] == [None] * n_new
    np.testing.assert_array_equal(saved["features"][:n_old], old_saved["features"])
    # each new item is its own nearest neighbour, found by its new id
    scores, ids = searched(grown, saved["features"][n_old:], 1)
    assert ids[:, 0].tolist() == result["added_ids"]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    # old items: their neighbours among the old items are what the earlier index answered
    k = 5
    want_scores, want_ids = searched(old, old_saved["features"], k)
    got_scores, got_ids = searched(grown, old_saved["features"], k + n_new)
    old_only = got_ids < n_old
    got_scores = np.array([s[m][:k] for s, m in zip(got_scores, old_only, strict=True)])
    got_ids = np.array([i[m][:k] for i, m in zip(got_ids, old_only, strict=True)])
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    # each id found is the item with that score (the barely trained model ties many items, which may come
    # in either order): no id points at another item's vector
    by_id = dict(zip(grown.ids, saved["features"], strict=True))
    cosines = np.einsum(
        "qd,qkd->qk", old_saved["features"], np.array([[by_id[i] for i in row] for row in got_ids])
    )
    np.testing.assert_allclose(got_scores, cosines, atol=1e-5)
    untied = np.all(np.diff(want_scores, axis=1) < -1e-5, axis=1)
    np.testing.assert_array_equal(got_ids[untied], want_ids[untied])
    if kind == "hnsw":  # measured again after the change, over all items and over the new ones
        assert grown.info["recall@10"] == pytest.approx(1.0) and grown.info["recall_queries"] == len(grown)
        assert grown.info["recall@10_added"] == pytest.approx(1.0)
        assert result["index_info"]["recall@10"] == grown.info["recall@10"]
    change = grown.info["changes"][-1]
    assert change["added"] == n_new and change["removed"] == [] and change["from"] == str(earlier)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_removed_items_are_never_returned(kind, request, new_photos, tmp_path, capsys):
    earlier = request.getfixturevalue("catalogue_index" if kind == "flat" else "hnsw_run")
    grown_run, shrunk_run = tmp_path / "grown", tmp_path / "shrunk"
    embed(embed_cfg(grown_run, f"add_to={earlier}", f"input={new_photos}"))
    grown = CatalogueIndex.load(grown_run / "index")
    before = folder_digest(grown_run)
    removed = [grown.ids[0], grown.ids[7], grown.ids[-1]]  # an old item, another, a new one
    (tmp_path / "ids.txt").write_text(f"# gone\n{removed[0]}\n{removed[1]}  # two\n\n{removed[2]}\n")
    embed(embed_cfg(shrunk_run, f"add_to={grown_run}", f"remove={tmp_path / 'ids.txt'}"))
    assert folder_digest(grown_run) == before
    shrunk = CatalogueIndex.load(shrunk_run / "index")
    saved = np.load(grown_run / "embeddings.npz")
    assert shrunk.ids == [i for i in grown.ids if i not in removed] and len(shrunk) == len(grown) - 3
    assert shrunk.items == [it for i, it in zip(grown.ids, grown.items, strict=True) if i not in removed]
    _, ids = searched(shrunk, saved["features"], len(shrunk))  # every vector, the removed ones too
    assert not set(ids.ravel().tolist()) & set(removed)
    assert set(ids.ravel().tolist()) == set(shrunk.ids)
    # the remaining items keep their ids, and an added item after a removal gets a fresh one
    assert shrunk.info["next_id"] == grown.info["next_id"]
    if kind == "hnsw":
        assert shrunk.info["recall@10"] == pytest.approx(1.0) and "recall@10_added" not in shrunk.info
    summary = capsys.readouterr().out
    assert "removed 3" in summary and f"index={shrunk_run}" in summary and "serve.py" in summary
    # remove and add in one run: a removed file comes back under a new id
    again = tmp_path / "again"
    back = Path(grown.items[-1])
    embed(embed_cfg(again, f"add_to={shrunk_run}", f"input={back}", f"remove=[{shrunk.ids[0]}]"))
    changed = CatalogueIndex.load(again / "index")
    assert changed.items[-1] == str(back) and changed.ids[-1] == grown.info["next_id"]
    assert shrunk.ids[0] not in changed.ids and len(changed.info["changes"]) == 3


def test_serve_answers_from_the_grown_index(serve_checkpoint, catalogue_index, new_photos, tmp_path):
    from skuvision.serving.catalogue import CatalogueImages, index_folder, load_index
    from skuvision.serving.predictor import Predictor, model_card

    embed(embed_cfg(tmp_path / "grown", f"add_to={catalogue_index}", f"input={new_photos}"))
    embed(embed_cfg(tmp_path / "run", f"add_to={tmp_path / 'grown'}", "remove=[0,1,2]"))
    index = load_index(index_folder(tmp_path / "run"))
    predictor = Predictor(model_card(str(serve_checkpoint)), index, k=2)
    new_files = sorted(new_photos.rglob("*.*"))
    images = torch.stack([predictor.decode(p.read_bytes()) for p in new_files])
    answers = predictor.answer(images)
    for path, answer in zip(new_files, answers, strict=True):
        top = answer["similar"][0]
        assert top["id"] == index.ids[index.items.index(str(path))] and top["label"] is None
        assert top["score"] == pytest.approx(1.0, abs=1e-4)
    assert index.ids[0] == 3  # ids, not rows: the removed 0..2 left a gap
    pictures = CatalogueImages(index, {}, predictor.card.input_config)
    assert pictures.thumbnail(3) is not None and pictures.thumbnail(0) is None


def refused(cfg, match: str):
    with pytest.raises(SkuvisionError, match=match) as raised:
        embed(cfg)
    assert "\n" not in str(raised.value)
    return str(raised.value)


def test_refusals_name_the_key_or_file(serve_checkpoint, catalogue_index, new_photos, tmp_path):
    run = tmp_path / "run"
    refused(
        embed_cfg(run, f"add_to={tmp_path / 'nowhere'}", "remove=[1]"), "add_to=.*nowhere: no such folder"
    )
    plain = tmp_path / "plain"
    plain.mkdir()
    refused(
        embed_cfg(run, f"add_to={plain}", "remove=[1]"), "not an embed run folder .*embeddings.npz, index"
    )
    link = tmp_path / "link"
    link.symlink_to(catalogue_index)
    refused(embed_cfg(run, f"add_to={link}", "remove=[1]"), "link is a symbolic link")
    copy = tmp_path / "copy"
    shutil.copytree(catalogue_index, copy)
    (copy / "embeddings.npz").unlink()
    (copy / "embeddings.npz").symlink_to(catalogue_index / "embeddings.npz")
    refused(embed_cfg(run, f"add_to={copy}", "remove=[1]"), "embeddings.npz is a symbolic link")
    refused(embed_cfg(run, f"add_to={catalogue_index}"), "nothing to change; give input=")
    refused(
        embed_cfg(run, f"add_to={catalogue_index}", "remove=[1,999,-4]"),
        r"2 id\(s\) not in .*items.csv \(-4, 999\)",
    )
    (tmp_path / "ids.txt").write_text("1\n2.5\n")
    refused(
        embed_cfg(run, f"add_to={catalogue_index}", f"remove={tmp_path / 'ids.txt'}"), "ids.txt line 2: '2.5'"
    )
    refused(
        embed_cfg(run, f"add_to={catalogue_index}", f"remove={tmp_path / 'none.txt'}"), "none.txt: no such"
    )
    all_ids = ",".join(map(str, CatalogueIndex.load(catalogue_index / "index").ids))
    refused(embed_cfg(run, f"add_to={catalogue_index}", f"remove=[{all_ids}]"), "leaving it empty")
    refused(embed_cfg(run, f"ckpt_path={serve_checkpoint}", "split=train", "remove=[1]"), "give add_to=")
    # another checkpoint (a copy with one byte more): refused before any image is embedded
    other = tmp_path / "other.ckpt"
    other.write_bytes(serve_checkpoint.read_bytes() + b"\0")
    message = refused(
        embed_cfg(run, f"add_to={catalogue_index}", f"input={new_photos}", f"ckpt_path={other}"),
        "not the checkpoint add_to=.* was built with",
    )
    assert str(other) in message
    # an image the index already holds
    old = CatalogueIndex.load(catalogue_index / "index").items[4]
    refused(embed_cfg(run, f"add_to={catalogue_index}", f"input={old}"), f"input: {old} is already item 4")
    refused(embed_cfg(run, f"add_to={catalogue_index}", f"input={os.path.relpath(old)}"), "is already item 4")
    # into the earlier run folder itself
    refused(embed_cfg(catalogue_index, f"add_to={catalogue_index}", "remove=[1]"), "embeddings.npz exists")
    assert not run.exists() or not any(run.iterdir())


def test_an_index_without_a_checkpoint_hash_is_checked_by_path(
    serve_checkpoint, catalogue_index, new_photos, tmp_path
):
    """Indexes written before the hash was recorded: the same file is taken, another path refused."""
    copy = tmp_path / "earlier"
    shutil.copytree(catalogue_index, copy)
    meta = json.loads((copy / "index" / "index.json").read_text())
    del meta["checkpoint_sha256"]
    (copy / "index" / "index.json").write_text(json.dumps(meta))
    other = tmp_path / "same_bytes.ckpt"
    shutil.copy(serve_checkpoint, other)
    refused(
        embed_cfg(tmp_path / "run", f"add_to={copy}", f"input={new_photos}", f"ckpt_path={other}"),
        "records no hash",
    )
    embed(embed_cfg(tmp_path / "run", f"add_to={copy}", f"input={new_photos}"))  # ckpt_path: the recorded one
    assert len(CatalogueIndex.load(tmp_path / "run" / "index")) == meta["count"] + 6


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ivfpq_add_and_remove_keep_ids_and_report_recall():
    """IVF lists keep stored row numbers: a removal must not leave them pointing at other items."""
    catalogue = unit_rows(400, 16, seed=0)
    params = {"nlist": 4, "m": 4, "nbits": 4, "nprobe": 4, "refine": "Flat", "recall_queries": 400}
    index = CatalogueIndex.build(catalogue, [f"i{k}" for k in range(400)], None, [], kind="ivfpq", **params)
    new = unit_rows(30, 16, seed=1)
    grown, features = index.changed(catalogue, range(0, 400, 2), new, [f"n{k}" for k in range(30)])
    assert len(grown) == 230 and grown.ids[:3] == [1, 3, 5] and grown.ids[-1] == 429
    _, ids = searched(grown, features, 1)
    assert (ids[:, 0] == np.array(grown.ids)).mean() > 0.95  # nearly every vector finds itself
    assert not set(ids.ravel().tolist()) & set(range(0, 400, 2))
    assert 0 < grown.info["recall@10"] <= 1 and "recall@10_added" in grown.info
    with pytest.raises(SkuvisionError, match="dimension 8, the index 16"):
        index.changed(catalogue, (), unit_rows(2, 8, seed=2), ["a", "b"])
    with pytest.raises(SkuvisionError, match="input: i3 is already in the index"):
        index.changed(catalogue, (), unit_rows(1, 16, seed=2), ["i3"])
    with pytest.raises(SkuvisionError, match="stored vectors have shape"):
        index.changed(catalogue[:10], (), new, [f"n{k}" for k in range(30)])
