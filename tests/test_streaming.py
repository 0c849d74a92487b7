"""data=streaming: litdata shards written by shard.py, from a folder and from an S3 endpoint on 127.0.0.1."""

import contextlib
import faulthandler
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import litdata
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skuvision.data import ImageFolderDataModule, StreamingDataModule
from skuvision.data.streaming import METADATA_FILE, read_metadata
from skuvision.errors import SkuvisionError
from skuvision.tasks.evaluate import evaluate
from skuvision.tasks.shard import shard
from skuvision.tasks.train import train
from tests.helpers import compose_cfg, quick_overrides, run_cli
from tests.writers import banded_portrait, pattern_images, red_pixels

N_IDS = 48  # training images of the id set, each its own class: a batch's labels name its images


@contextlib.contextmanager
def hang_guard(seconds: int):
    """A hang (DDP waiting on an uneven rank, a stuck S3 worker) fails the test run instead of blocking CI."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def write_shards(data_overrides: list[str], output: str, run: Path, extra: list[str] = ()) -> dict:
    overrides = [
        *data_overrides,
        "model=simple_cnn",
        "input.image_size=32",
        f"output={output}",
        "encoding=png",  # lossless: the streamed pixels are the image folder's, bit for bit
        "workers=1",
        "threads=2",
        *extra,
    ]
    return shard(compose_cfg("shard", overrides, run))


@pytest.fixture(scope="module")
def photo_shards(data_root, tmp_path_factory) -> Path:
    """data_root's photos (3 classes, split 30/3/3 as data=image_folder splits them) as shards."""
    out = tmp_path_factory.mktemp("photo_shards") / "shards"
    write_shards(["data=image_folder", f"data.root={data_root / 'photos'}"], str(out), out.parent / "run")
    return out


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory) -> Path:
    """48 training images, each its own class id00..id47, and 4 val and 4 test images, from a manifest."""
    root = tmp_path_factory.mktemp("ids")
    labels = np.arange(N_IDS + 8) % N_IDS
    rows = []
    for i, image in enumerate(pattern_images(labels % 8, 32, 3, seed=3)):
        Image.fromarray(image).save(root / f"img_{i:03d}.png")
        split = "train" if i < N_IDS else "val" if i < N_IDS + 4 else "test"
        rows.append((f"img_{i:03d}.png", f"id{labels[i]:02d}", split))
    pd.DataFrame(rows, columns=["path", "sku", "split"]).to_csv(root / "ids.csv", index=False)
    manifest = [
        "data=manifest",
        f"data.root={root / 'ids.csv'}",
        "data.label_column=sku",
        "data.split_column=split",
    ]
    write_shards(manifest, str(root / "shards"), root / "run")
    return root / "shards"


def streaming_overrides(shards: str, extra: list[str] = ()) -> list[str]:
    """quick_overrides' small CPU run, on data=streaming (which has no data.download)."""
    quick = quick_overrides("image_folder", Path("/unused"))
    quick = [o for o in quick if not o.startswith(("data=", "data.root=", "data.download="))]
    return [*quick, "data=streaming", f"data.root={shards}", *extra]


def test_shards_hold_the_splits_classes_and_geometry(photo_shards, tmp_path):
    metadata = read_metadata(str(photo_shards))
    assert metadata["class_names"] == ["phone", "shirt", "toaster"]
    assert {s: sum(c.values()) for s, c in metadata["counts"].items()} == {"train": 30, "val": 3, "test": 3}
    assert metadata["image_size"] >= 32 and metadata["in_chans"] == 3
    for split in ("train", "val", "test"):
        assert (photo_shards / split / "index.json").is_file()
    with pytest.raises(SkuvisionError, match=r"^output=.* already holds shards"):
        write_shards(["data=image_folder", "data.root=/unused"], str(photo_shards), tmp_path / "again")


def test_shards_store_each_source_path_as_its_name_not_its_image(data_root, tmp_path):
    """A mixed PNG and JPEG folder shards (litdata read a path string of an existing image as that image,
    and refused chunks of two image formats), and each item's `path` is the source file's path."""
    root = tmp_path / "photos"
    shutil.copytree(data_root / "photos", root)
    for png in list((root / "phone").glob("*.png"))[:3]:
        Image.open(png).convert("RGB").save(png.with_suffix(".jpg"), quality=95)
        png.unlink()
    out = tmp_path / "shards"
    write_shards(["data=image_folder", f"data.root={root}"], str(out), tmp_path / "run", ["workers=2"])
    data_format = json.loads((out / "train" / "index.json").read_text())["config"]["data_format"]
    assert "str" not in data_format and not any(f.startswith("image") for f in data_format)
    stored = litdata.StreamingDataset(str(out / "train"))
    paths = {Path(stored[i]["path"].decode()) for i in range(len(stored))}
    assert len(paths) == len(stored) and all(p.is_file() and root in p.parents for p in paths)
    assert any(p.suffix == ".jpg" for p in paths)


def test_only_image_file_sources_are_sharded(data_root, tmp_path):
    source = ["data=fashion_mnist", f"data.root={data_root / 'fashion_mnist'}", "data.system_dirs=[]"]
    with pytest.raises(
        SkuvisionError, match=r"is not read from image files: shard.py takes data=image_folder"
    ):
        write_shards([*source, "data.download=false"], str(tmp_path / "shards"), tmp_path / "run")
    assert not (tmp_path / "shards").exists()


def test_a_model_bigger_than_the_shards_and_a_folder_without_shards_are_refused(photo_shards, tmp_path):
    input_64 = {"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
    with pytest.raises(SkuvisionError, match=r"hold \d+ px images; input.image_size=64 resizes to 64 px"):
        StreamingDataModule(str(photo_shards), {**input_64, "crop_pct": 1.0})
    with pytest.raises(SkuvisionError, match=f"holds no {METADATA_FILE}: write shards there first"):
        StreamingDataModule(str(tmp_path), {**input_64, "crop_pct": 1.0})


@pytest.mark.parametrize("crop_mode", ["squash", "border"])
def test_shards_keep_the_whole_photo_for_squash_and_border_and_refuse_another_crop_mode(tmp_path, crop_mode):
    """shard.py stores the square the model's crop_mode makes (the whole 3:4 photo squashed, or fitted and
    padded), and streams it as the image folder's eval transform would; shards cropped or padded for
    another mode would show the model other images, so a model of another mode is refused in one line."""
    root = tmp_path / "portraits"
    for c, name in enumerate(("kettle", "shirt")):
        (root / name).mkdir(parents=True)
        for i in range(6):
            banded_portrait(seed=10 * c + i).save(root / name / f"{name}_{i}.png")
    shards = tmp_path / "shards"
    metadata = write_shards(
        ["data=image_folder", f"data.root={root}"],
        str(shards),
        tmp_path / "run",
        [f"input.crop_mode={crop_mode}"],
    )
    model_input = metadata["model_input"]
    assert model_input["crop_mode"] == crop_mode
    streamed = StreamingDataModule(str(shards), model_input)
    streamed.setup()
    folder = ImageFolderDataModule(str(root), model_input)
    folder.setup()
    read = [folder.splits["test"][i][0] for i in range(len(folder.splits["test"]))]
    assert len(streamed.splits["test"]) == len(read) > 0
    fill = torch.tensor([round(255 * m) for m in model_input["mean"]], dtype=torch.uint8).view(3, 1, 1)
    for i in range(len(streamed.splits["test"])):
        image, _ = streamed.splits["test"][i]
        assert any(torch.equal(image, other) for other in read)  # lossless shards: the folder's pixels
        red = red_pixels(image)
        if crop_mode == "squash":
            assert red[0].all() and red[-1].all()
        else:  # 60x80 fitted into 32x32: 24x32, padded with timm's fill
            assert red[0, 4:28].all() and red[-1, 4:28].all() and (image[:, :, :4] == fill).all()
    with pytest.raises(
        SkuvisionError,
        match=rf"^the shards in {shards} hold images for input.crop_mode={crop_mode}.*, this model takes "
        r"center: write shards for it \(python shard.py model=\.\.\. input.crop_mode=center\)$",
    ):
        StreamingDataModule(str(shards), {**model_input, "crop_mode": "center"})
    if crop_mode == "border":  # padded with another model's mean
        padded = r"border \(padded with \[128, 128, 128\]\), this model takes border \(padded with \[102, "
        with pytest.raises(SkuvisionError, match=padded):
            StreamingDataModule(str(shards), {**model_input, "mean": [0.4, 0.4, 0.4]})


def test_fewer_training_images_than_a_batch_is_refused(photo_shards):
    model_input = read_metadata(str(photo_shards))["model_input"]
    datamodule = StreamingDataModule(str(photo_shards), model_input, batch_size=64)
    with pytest.raises(
        SkuvisionError, match=r"hold 30 training images, fewer than one batch \(data.batch_size=64"
    ):
        datamodule.train_dataloader()


@pytest.mark.slow
def test_two_process_ddp_sees_every_training_image_once_per_epoch_in_equal_batches(id_shards, tmp_path):
    """2 gloo processes of 2 loader workers, 4 images per process and step: 6 steps each per epoch, 48
    distinct images."""
    overrides = streaming_overrides(
        str(id_shards),
        [
            "trainer=ddp_cpu",
            "trainer.strategy=ddp",  # rank 0 is this process: one start-up fewer than ddp_spawn
            "trainer.max_epochs=2",
            "trainer.num_sanity_val_steps=0",
            "trainer.precision=32",
            "test=false",
            "+callbacks.seen._target_=tests.probes.SeenLabels",
            "threads=1",
            "data.num_workers=2",  # litdata divides each rank's share among its workers too
        ],
    )
    env = {"OMP_NUM_THREADS": "1"}
    result = run_cli("train.py", overrides, tmp_path, env)  # a hang fails at run_cli's timeout
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    seen = [json.loads((runs[0] / f"seen_rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("0", "1"):
        batches = [seen[r][epoch] for r in (0, 1)]
        assert len(batches[0]) == len(batches[1]) == N_IDS // 8
        assert all(len(b) == 4 for rank in batches for b in rank)
        images = [label for rank in batches for batch in rank for label in batch]
        assert sorted(images) == list(range(N_IDS)), f"epoch {epoch}: an image seen twice or never"
    assert seen[0]["0"] != seen[0]["1"]  # reshuffled each epoch


def test_a_run_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(
    photo_shards, data_root, tmp_path
):
    """30 training images, batches of 8: 3 steps an epoch. Killed after step 4 (inside the second epoch), the
    resumed run must continue with batch 2 of that epoch from its checkpoint, not restart the epoch.

    Bit-identical on purpose: no dropout and no augmentation (their random draws are not in a checkpoint),
    one process, deterministic kernels; the data order comes from litdata's seed and the loader's state."""
    common = [
        "trainer.max_epochs=2",
        "trainer.deterministic=true",
        "trainer.precision=32",
        "model.kwargs.drop_rate=0",
        "augment=none",
        "test=false",
    ]

    def run(name: str, extra: list[str]):
        cfg = compose_cfg("train", streaming_overrides(str(photo_shards), common + extra), tmp_path / name)
        with hang_guard(240):
            train(cfg)
        return tmp_path / name / "checkpoints" / "last.ckpt"

    whole = torch.load(run("whole", []), weights_only=True, map_location="cpu")
    assert whole["global_step"] == 6

    killed_at = tmp_path / "killed.ckpt"
    kill = [
        "+callbacks.kill._target_=tests.probes.KillAtStep",
        "+callbacks.kill.step=4",
        f"+callbacks.kill.path={killed_at}",
    ]
    with pytest.raises(RuntimeError, match="killed after step 4"):
        run("killed", kill)
    saved = torch.load(killed_at, weights_only=True, map_location="cpu")
    loader_state = saved["StreamingDataModule"]["train_loader"]
    assert loader_state["num_samples_yielded"] == 8  # one batch into the second epoch

    epoch_end = tmp_path / "killed" / "checkpoints" / "last.ckpt"  # written after the first epoch
    for name, start in (("resumed", killed_at), ("requeued", epoch_end)):
        resumed = torch.load(run(name, [f"ckpt_path={start}"]), weights_only=True, map_location="cpu")
        assert resumed["global_step"] == 6
        for key, tensor in whole["state_dict"].items():
            assert torch.equal(resumed["state_dict"][key], tensor), f"{name}: {key}"


def test_test_metrics_equal_those_of_the_same_photos_read_as_an_image_folder(
    photo_shards, data_root, tmp_path
):
    overrides = quick_overrides("image_folder", data_root) + ["trainer.max_epochs=1", "trainer.precision=32"]
    trained = train(compose_cfg("train", overrides, tmp_path / "run"))
    best = json.loads((tmp_path / "run" / "metrics.json").read_text())["checkpoint"]
    streamed = evaluate(
        compose_cfg(
            "eval",
            [
                f"ckpt_path={best}",
                "data=streaming",
                f"data.root={photo_shards}",
                "data.num_workers=0",
                "trainer.accelerator=cpu",
                "trainer.precision=32",
                "threads=2",
            ],
            tmp_path / "eval",
        )
    )
    for key in ("test/acc", "test/f1_macro", "test/loss"):
        assert streamed[key] == pytest.approx(trained[key], abs=1e-6), key

    from skuvision.tasks.embed import embed

    overrides = [
        f"ckpt_path={best}",
        "data=streaming",
        f"data.root={photo_shards}",
        "split=val",
        "num_workers=0",
    ]
    embedded = np.load(embed(compose_cfg("embed", overrides, tmp_path / "embed"))["embeddings"])
    assert sorted(embedded["labels"].tolist()) == [0, 1, 2]  # the 3 val images, one per class


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_endpoint(monkeypatch):
    """An S3-protocol server (moto) on 127.0.0.1 with a bucket; stopped after the test."""
    pytest.importorskip("moto", reason="moto[server] is not installed: no local S3 endpoint to test against")
    import boto3

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        client = boto3.client("s3")
        for _ in range(100):
            with contextlib.suppress(Exception):
                client.create_bucket(Bucket="shop-shards")
                break
            time.sleep(0.1)
        else:
            pytest.fail("the local S3 server did not start")
        yield client
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_litdata_still_has_the_client_switch_for_plain_http():
    """use_boto3_for_plain_http sets litdata's private _OBSTORE_AVAILABLE (litdata 0.2.76)."""
    import litdata.streaming.downloader as downloader

    assert hasattr(downloader, "_OBSTORE_AVAILABLE") and hasattr(downloader, "obstore_usable")


@pytest.mark.slow
def test_shards_in_a_bucket_train_like_the_same_shards_in_a_folder(
    s3_endpoint, photo_shards, data_root, tmp_path, monkeypatch
):
    """The bucket path through litdata's real S3 client, on its boto3 path: litdata's obstore client refuses
    plain http, which is all a local endpoint speaks (real buckets are https and use obstore)."""
    import litdata.streaming.downloader as downloader

    from skuvision.compat import use_boto3_for_plain_http

    monkeypatch.setattr(downloader, "_OBSTORE_AVAILABLE", downloader._OBSTORE_AVAILABLE)  # put back after
    use_boto3_for_plain_http()
    assert not downloader.obstore_usable()
    url = "s3://shop-shards/photos-32"
    with hang_guard(240):
        write_shards(["data=image_folder", f"data.root={data_root / 'photos'}"], url, tmp_path / "shard")
    keys = {o["Key"] for o in s3_endpoint.list_objects_v2(Bucket="shop-shards")["Contents"]}
    assert "photos-32/skuvision_shards.json" in keys and "photos-32/train/index.json" in keys

    overrides = streaming_overrides(
        url,
        [
            "trainer.max_epochs=1",
            "trainer.precision=32",
            "data.num_workers=1",
            f"data.cache_dir={tmp_path / 'chunks'}",
        ],
    )
    with hang_guard(240):
        metrics = train(compose_cfg("train", overrides, tmp_path / "run"))
    assert list((tmp_path / "chunks").rglob("chunk-*.bin")), "nothing was downloaded from the bucket"
    best = json.loads((tmp_path / "run" / "metrics.json").read_text())["checkpoint"]
    local = evaluate(
        compose_cfg(
            "eval",
            [f"ckpt_path={best}", "data=streaming", f"data.root={photo_shards}", "data.num_workers=0"]
            + ["trainer.accelerator=cpu", "trainer.precision=32", "threads=2"],
            tmp_path / "eval",
        )
    )
    for key in ("test/acc", "test/f1_macro", "test/loss"):
        assert metrics[key] == pytest.approx(local[key], abs=1e-6), key
