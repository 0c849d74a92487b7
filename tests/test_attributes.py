"""Several attributes, one model: label columns (softmax heads, empty values masked), tag columns (sigmoid
heads) and the coarser levels of a taxonomy read off a finer head."""

import numpy as np
import pandas as pd
import pytest
import torch

from skuvision.data import ManifestDataModule
from skuvision.data.taxonomy import find_taxonomy
from skuvision.host_reads import counting_host_reads
from skuvision.metrics import MistakeSeverity, tag_metrics
from skuvision.models.classifier import Classifier
from skuvision.models.heads import MISSING, HeadLosses, heads_from_specs
from tests.test_manifest import INPUT_32

torch.set_num_threads(2)

TYPES = ["Heels", "Sandals", "Shirts", "Tshirts"]
MASTER = {"Heels": "Footwear", "Sandals": "Footwear", "Shirts": "Apparel", "Tshirts": "Apparel"}
HEADS = [
    {"column": "articleType", "kind": "label", "classes": TYPES},
    {
        "column": "masterCategory",
        "kind": "label",
        "classes": ["Apparel", "Footwear"],
        "source": "articleType",
        "parents": [1, 1, 0, 0],
    },
    {"column": "baseColour", "kind": "label", "classes": ["Blue", "Green", "Red"]},
    {"column": "tags", "kind": "tags", "classes": ["floral", "sticker"]},
]


def classifier(heads=HEADS, **kwargs) -> Classifier:
    torch.manual_seed(0)
    return Classifier(
        model={"_target_": "skuvision.models.create_backbone", "name": "simple_cnn", "pretrained": False},
        input_config=INPUT_32,
        num_classes=len(heads[0]["classes"]),
        in_chans=3,
        class_names=heads[0]["classes"],
        optimizer={"_target_": "torch.optim.SGD", "lr": 0.1},
        heads=heads,
        **kwargs,
    )


def head_grads(module: Classifier, images, targets) -> dict[str, torch.Tensor]:
    module.zero_grad()
    module.criterion(module(images), targets).backward()
    return {c: layer.weight.grad.clone() for c, layer in module.multi_head.layers.items()}


def test_a_row_without_a_colour_trains_the_category_head_and_not_the_colour_head():
    module = classifier()
    images = torch.randn(2, 3, 32, 32)
    targets = {
        "articleType": torch.tensor([0, 2]),
        "masterCategory": torch.tensor([1, 0]),
        "baseColour": torch.tensor([1, MISSING]),  # the second row has no colour
        "tags": torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
    }
    module.eval()  # no dropout or batch statistics: each row's gradient is its own
    only_empty = head_grads(module, images[1:], {k: v[1:] for k, v in targets.items()})
    assert torch.count_nonzero(only_empty["baseColour"]) == 0
    assert torch.count_nonzero(only_empty["articleType"]) > 0
    assert torch.count_nonzero(only_empty["tags"]) > 0
    # With the row beside one that has a colour, the colour head learns from that row alone.
    both = head_grads(module, images, targets)
    first = head_grads(module, images[:1], {k: v[:1] for k, v in targets.items()})
    torch.testing.assert_close(both["baseColour"], first["baseColour"])
    assert not torch.allclose(both["articleType"], first["articleType"])


def test_a_batch_with_no_colour_at_all_gives_a_finite_loss():
    module = classifier()
    targets = {
        "articleType": torch.tensor([0, 2]),
        "masterCategory": torch.tensor([1, 0]),
        "baseColour": torch.tensor([MISSING, MISSING]),
        "tags": torch.zeros(2, 2),
    }
    loss = module.criterion(module(torch.randn(2, 3, 32, 32)), targets)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_asymmetric_tag_loss_stays_finite_in_half_precision(dtype):
    heads = heads_from_specs(HEADS)
    losses = HeadLosses(heads, tag_loss="asl")
    tags = heads[-1]
    logits = torch.tensor([[30.0, -30.0], [-20.0, 25.0]], dtype=dtype, requires_grad=True)
    loss = losses.head_loss(tags, logits, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_coarser_levels_always_agree_with_the_predicted_finer_level():
    module = classifier().eval()
    torch.manual_seed(1)
    with torch.no_grad():
        out = module(torch.randn(64, 3, 32, 32) * 3)
    fine, coarse = out["articleType"], out["masterCategory"]
    parents = torch.tensor(HEADS[1]["parents"])
    assert torch.equal(coarse.argmax(1), parents[fine.argmax(1)])
    # Its probabilities are the sums of the finer level's.
    summed = torch.zeros(64, 2).index_add_(1, parents, fine.float().softmax(1))
    torch.testing.assert_close(coarse.softmax(1), summed)
    assert len(list(module.multi_head.layers)) == 3  # the coarser level has no weights of its own


def independent_table(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "articleType": rng.choice(TYPES, n),
            "baseColour": rng.choice(["Blue", "Green", "Red"], n),
            "usage": rng.choice(["Casual", "Formal"], n),
        }
    )


def test_a_taxonomy_is_found_only_where_one_column_is_a_function_of_another():
    table = independent_table()
    assert find_taxonomy(table, list(table.columns)) == {}
    table["masterCategory"] = table["articleType"].map(MASTER)
    found = find_taxonomy(table, list(table.columns))
    assert found == {"masterCategory": ("articleType", MASTER)}
    # One row saying otherwise: no longer a function, no hierarchy.
    table.loc[0, "masterCategory"] = (
        "Apparel" if MASTER[table.loc[0, "articleType"]] == "Footwear" else "Footwear"
    )
    assert find_taxonomy(table, list(table.columns)) == {}


def test_rows_of_one_each_are_not_taken_for_a_hierarchy():
    table = pd.DataFrame({"sku": [f"s{i}" for i in range(12)], "colour": ["Red", "Blue"] * 6})
    assert find_taxonomy(table, ["sku", "colour"]) == {}


def write_table(tmp_path, table: pd.DataFrame):
    from tests.writers import write_image_folder

    folder = write_image_folder(tmp_path / "imgs", classes=("a",), per_class=len(table), size=32)
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))
    table = table.assign(path=[str(p) for p in files])
    table.to_csv(tmp_path / "styles.csv", index=False)
    return tmp_path / "styles.csv"


def test_the_data_module_reads_heads_taxonomy_and_tags_from_the_table(tmp_path):
    table = independent_table(60)
    table["masterCategory"] = table["articleType"].map(MASTER)
    table["tags"] = ["sticker;floral", "", " sticker ", "floral"] * 15
    table.loc[3, "baseColour"] = ""
    csv = write_table(tmp_path, table)
    dm = ManifestDataModule(
        str(csv),
        INPUT_32,
        label_columns=["articleType", "masterCategory", "baseColour", "usage"],
        tag_columns=["tags"],
    )
    heads = {h["column"]: h for h in dm.heads}
    assert heads["masterCategory"]["source"] == "articleType"
    assert "source" not in heads["baseColour"] and "source" not in heads["usage"]
    assert heads["tags"]["classes"] == ["floral", "sticker"]
    dm.setup()
    rows = {
        str(path): targets
        for (path, _), targets in zip(dm.splits["train"].samples, dm.splits["train"].row_targets, strict=True)
    }
    by_path = pd.read_csv(csv, dtype=str, keep_default_na=False).set_index("path")
    for path, targets in rows.items():
        row = by_path.loc[path]
        assert targets["baseColour"] == (
            MISSING if row["baseColour"] == "" else heads["baseColour"]["classes"].index(row["baseColour"])
        )
        expected = {t.strip() for t in row["tags"].split(";") if t.strip()}
        assert {
            heads["tags"]["classes"][k] for k in torch.nonzero(targets["tags"]).flatten().tolist()
        } == expected
    report = dm.data_report()["columns"]
    assert sum(report["missing_values"]["baseColour"].values()) == 1
    assert report["taxonomy"]["masterCategory"]["parents"] == MASTER


def test_a_real_catalogue_export_trains_every_attribute_and_lists_every_defect(
    catalogue_export, catalogue_run
):
    """styles.csv as the public export has it: no path column (images/<id>.jpg), portrait photos, a line
    with an unquoted comma, images missing, colours left empty; three label columns and a tag column."""
    import json

    from tests.conftest import BROKEN_LINE, MISSING_IMAGES

    skipped = json.loads((catalogue_run / "skipped_images.json").read_text())
    assert skipped[f"{catalogue_export} line {BROKEN_LINE}"] == "12 fields where the header has 11"
    for k in MISSING_IMAGES:
        assert skipped[str(catalogue_export.parent / "images" / f"{10000 + k}.jpg")].startswith(
            "file not found"
        )
    assert len(skipped) == 1 + len(MISSING_IMAGES)
    columns = json.loads((catalogue_run / "columns.json").read_text())
    table = pd.read_csv(catalogue_export, dtype=str, keep_default_na=False, on_bad_lines="skip")
    kept = table[~table["id"].isin([str(10000 + k) for k in MISSING_IMAGES])]
    assert sum(columns["missing_values"]["baseColour"].values()) == (kept["baseColour"] == "").sum() > 0
    assert columns["taxonomy"]["masterCategory"]["source"] == "articleType"
    # Each head learns: well above chance (1/4, 1/2, 1/3) and tags well above their frequency (about 0.35).
    metrics = json.loads((catalogue_run / "metrics.json").read_text())
    assert metrics["test/articleType/acc"] >= 0.8
    assert metrics["test/masterCategory/acc"] >= 0.9
    assert metrics["test/baseColour/acc"] >= 0.7
    assert metrics["test/tags/map"] >= 0.7
    assert {"test/articleType/mistake_severity", "test/tags/f1", "val/acc"} <= set(metrics)


def test_every_head_is_the_head_stage_of_each_fine_tuning_strategy():
    """Each head's weights are in the optimizer's groups up front, in timm's head stage: a linear probe
    trains every head and leaves the backbone bit-identical."""
    from skuvision.finetune.groups import stage_param_names

    module = classifier(finetune={"_target_": "skuvision.finetune.LinearProbe", "head_lr_scale": 10.0})
    head_params = {
        f"fc.layers.{c}.{w}" for c in ("articleType", "baseColour", "tags") for w in ("weight", "bias")
    }
    assert head_params <= set(stage_param_names(module.backbone)[-1])
    groups = module.finetune.param_groups(module.backbone, 0.1, 0.0)
    grouped = {name for g in groups for name in g["param_names"]}
    assert grouped == {name for name, _ in module.backbone.named_parameters()}
    assert all(g["lr"] == 1.0 for g in groups if set(g["param_names"]) & head_params)
    module.finetune.apply(module.backbone, epoch=0)
    before = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
    optimizer = torch.optim.SGD(groups, lr=0.1)
    targets = {
        "articleType": torch.tensor([0, 3]),
        "masterCategory": torch.tensor([1, 0]),
        "baseColour": torch.tensor([2, 0]),
        "tags": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
    }
    module.criterion(module(torch.randn(2, 3, 32, 32)), targets).backward()
    optimizer.step()
    for name, param in module.backbone.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == (name in head_params), name


def test_a_multi_head_checkpoint_reloads_to_the_same_predictions(tmp_path):
    from skuvision.checkpoints import load_classifier

    module = classifier().eval()
    path = tmp_path / "model.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": "2.5.0",
        },
        path,
    )
    reloaded = load_classifier(path).eval()
    assert [h.column for h in reloaded.heads] == ["articleType", "masterCategory", "baseColour", "tags"]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        first, again = module(x), reloaded(x)
    for column in first:
        torch.testing.assert_close(first[column], again[column], rtol=0, atol=0)


def test_class_balance_by_loss_weights_each_label_head_by_its_own_counts(tmp_path):
    table = independent_table(60)
    table["baseColour"] = ["Red"] * 40 + ["Blue"] * 20
    csv = write_table(tmp_path, table)
    dm = ManifestDataModule(str(csv), INPUT_32, label_columns=["articleType", "baseColour"], balance="loss")
    weights = dm.loss_class_weights()
    assert set(weights) == {"articleType", "baseColour"}
    train_colours = [t["baseColour"] for t in dm.splits_targets("train")]
    counts = np.bincount(train_colours)
    assert weights["baseColour"] == pytest.approx((counts.sum() / (2 * counts)).tolist())


def test_mixup_is_refused_for_a_table_of_several_columns(tmp_path):
    from skuvision.data.augment import MixupCutmix
    from skuvision.errors import SkuvisionError

    csv = write_table(tmp_path, independent_table(20))
    with pytest.raises(SkuvisionError, match="mixup_cutmix.*label_columns"):
        ManifestDataModule(
            str(csv), INPUT_32, label_columns=["articleType", "baseColour"], augment=MixupCutmix()
        )


def test_mistake_severity_counts_how_far_up_wrong_answers_go_leaving_out_rows_without_a_label():
    severity = MistakeSeverity([[0, 0, 1, 1]], MISSING)  # four classes under two
    predicted = torch.tensor([1, 2, 3, 2, 0])
    target = torch.tensor([0, 0, 3, MISSING, MISSING])  # wrong within its parent, wrong above it, right
    with counting_host_reads() as reads:
        severity.update(torch.nn.functional.one_hot(predicted, 4).float(), target)
    assert reads.reads == {}
    assert severity.compute().item() == pytest.approx(1.5)


def test_tag_metrics_given_probabilities_give_torchmetrics_figures_for_the_logits_without_host_reads():
    from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score

    torch.manual_seed(0)
    batches = [(3 * torch.randn(16, 5), torch.randint(0, 2, (16, 5))) for _ in range(3)]
    ours = tag_metrics(5)
    theirs = {"map": MultilabelAveragePrecision(5), "f1": MultilabelF1Score(5)}
    for logits, target in batches:
        with counting_host_reads() as reads:
            ours.update(logits.sigmoid(), target)
        assert reads.reads == {}, reads.describe(None)
        for metric in theirs.values():
            metric.update(logits, target)
    figures = ours.compute()
    for name, metric in theirs.items():
        torch.testing.assert_close(figures[name], metric.compute())
