"""Logits and embeddings from one backbone pass (Classifier.logits_and_embedding): the classifier layer on
the embedding gives the whole forward's logits for every head layout and TTA mode, and a backbone where it
would not is noticed on the first batch and runs its forward instead."""

import pytest
import torch

from skuvision.models.classifier import Classifier
from tests.test_attributes import HEADS, INPUT_32

torch.set_num_threads(2)


def classifier(name: str, heads=None, **kwargs) -> Classifier:
    torch.manual_seed(0)
    classes = heads[0]["classes"] if heads else ["a", "b", "c"]
    module = Classifier(
        model={
            "_target_": "skuvision.models.create_backbone",
            "name": name,
            "pretrained": False,
            "channels_last": not name.startswith("vit"),
            "kwargs": kwargs,
        },
        input_config=INPUT_32,
        num_classes=len(classes),
        in_chans=3,
        class_names=classes,
        optimizer={"_target_": "torch.optim.SGD", "lr": 0.1},
        heads=heads,
    )
    return module.eval()


def assert_same(a, b) -> None:
    if isinstance(b, dict):
        assert a.keys() == b.keys()
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    else:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name,heads,tta",
    [
        ("simple_cnn", None, "none"),
        ("simple_cnn", HEADS, "flip"),  # several heads, a derived one among them
        ("resnet18", None, "flip_shift"),
        ("convnext_atto", None, "none"),  # a norm + MLP head before its classifier layer
        ("vit_tiny_patch16_224", None, "flip"),  # a class token and fc_norm before it
    ],
)
@torch.inference_mode()
def test_one_pass_gives_the_forwards_logits_and_the_embedding(name, heads, tta):
    module = classifier(name, heads, **({"img_size": 32} if name.startswith("vit") else {}))
    images = torch.randn(4, 3, 32, 32)
    logits, embedding = module.logits_and_embedding(images, tta)
    assert module.head_alone_matches is True
    assert_same(logits, module.predict_logits(images, tta))
    torch.testing.assert_close(embedding, module.embed(images))
    again, _ = module.logits_and_embedding(images[:2], tta)  # the checked path, not the first batch's
    assert_same(again, module.predict_logits(images[:2], tta))


@torch.inference_mode()
def test_a_backbone_whose_forward_is_not_its_classifier_on_the_embedding_runs_its_forward():
    module = classifier("simple_cnn")
    original = module.backbone.forward
    module.backbone.forward = lambda x: original(x) + 1.0  # something after the classifier layer
    images = torch.randn(4, 3, 32, 32)
    logits, _ = module.logits_and_embedding(images, "flip")
    assert module.head_alone_matches is False
    assert_same(logits, module.predict_logits(images, "flip"))
    later, _ = module.logits_and_embedding(images[:3], "none")
    assert_same(later, module.predict_logits(images[:3], "none"))
