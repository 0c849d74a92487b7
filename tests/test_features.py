"""One embedding extractor (skuvision.features): embed.py's index vectors, eval.py's unknown-product reference
and the prototypes' training features are the same vectors for the same images."""

import shutil

import numpy as np
import torch
import torch.nn.functional as F

from skuvision import prototypes, unknown
from skuvision.assembly import build_trainer, data_module, from_checkpoint
from tests.helpers import compose_cfg


def test_embed_unknown_reference_and_prototypes_read_the_same_vectors(
    serve_checkpoint, catalogue_index, shop, tmp_path, monkeypatch
):
    saved = np.load(catalogue_index / "embeddings.npz")  # embed.py split=train
    embedded, items = torch.from_numpy(saved["features"]), list(saved["items"])
    cfg = compose_cfg(
        "eval",
        [f"ckpt_path={serve_checkpoint}", "trainer.accelerator=cpu", "trainer.precision=32"],
        tmp_path / "run",
    )
    module, datamodule = from_checkpoint(serve_checkpoint, None, split="test")
    trainer = build_trainer(cfg, [], enable_checkpointing=False)
    datamodule.setup("predict")
    assert datamodule.sample_paths("train") == items  # the same images, in the same order
    reference = unknown.reference_features(trainer, module, datamodule, None, seed=0)

    seen = []  # what prototypes.build centres: the training split's raw features, then its examples'
    means = prototypes.class_means
    monkeypatch.setattr(prototypes, "class_means", lambda f, *a: seen.append(f) or means(f, *a))
    examples = tmp_path / "examples" / "mug"
    examples.mkdir(parents=True)
    shutil.copy(items[0], examples / f"a{items[0][-4:]}")
    train = data_module(module.hparams.data, module.input_config, "train")
    built = prototypes.build(examples.parent, serve_checkpoint, trainer, module, train, 8, 0)
    train_raw, example = seen

    assert embedded.shape == reference.shape == train_raw.shape and len(items) > 10
    torch.testing.assert_close(reference, embedded, atol=1e-6, rtol=0)
    torch.testing.assert_close(F.normalize(train_raw, dim=1), embedded, atol=1e-6, rtol=0)
    torch.testing.assert_close(F.normalize(example, dim=1), embedded[:1], atol=1e-6, rtol=0)
    # The stored mean is that of the raw (not normalized) features: normalizing first would move it.
    np.testing.assert_allclose(built.mean, train_raw.mean(dim=0).numpy(), atol=1e-6)
    assert not np.allclose(built.mean, F.normalize(train_raw, dim=1).mean(dim=0).numpy(), atol=1e-3)
