"""Every option of every group that names code has a `_target_`, and every `_target_` imports: a newcomer
who opens any YAML finds the code behind it in one hop."""

import inspect

import pytest
from hydra.utils import get_object
from omegaconf import OmegaConf

from skuvision.data import ImageDataModule
from tests.helpers import CONF, compose_cfg

# Groups whose options each build one object.
ONE_OBJECT_GROUPS = ("data", "model", "finetune", "optimizer", "scheduler", "augment", "trainer")
# Groups whose options hold named entries, each building one object (null entries are switched off).
MANY_OBJECT_GROUPS = ("callbacks", "logger")
# Settings that several options of a group include through their defaults list; not options themselves.
SHARED_FOLDER = "common"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def targets(node) -> list[str]:
    """Every `_target_` value in a config tree (plain dicts and lists, interpolations unresolved)."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "_target_"] + [
            t for k, v in node.items() if k != "_target_" for t in targets(v)
        ]
    if isinstance(node, list):
        return [t for item in node for t in targets(item)]
    return []


def test_the_walk_covers_every_group():
    # conf/ is a package (pkg://skuvision.conf): Python may leave its __pycache__ there, which is no group
    groups = {p.name for p in CONF.iterdir() if p.is_dir() and p.name != "__pycache__"}
    without_code = {"paths", "experiment", "debug", "hparams_search", "hydra"}
    assert groups == set(ONE_OBJECT_GROUPS) | set(MANY_OBJECT_GROUPS) | without_code


@pytest.mark.parametrize("path", sorted(CONF.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF)))
def test_every_target_imports(path):
    for target in targets(OmegaConf.to_container(OmegaConf.load(path), resolve=False)):
        assert get_object(target) is not None, f"{path}: {target}"


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g in ONE_OBJECT_GROUPS + MANY_OBJECT_GROUPS for o in options(g)]
)
def test_every_option_names_its_code(tmp_path, group, option):
    cfg = compose_cfg("train", [f"{group}={option}", "data.root=/photos"], tmp_path / "run")
    node = cfg[group]
    if group in MANY_OBJECT_GROUPS:
        entries = [entry for entry in node.values() if entry is not None]
        assert entries and all("_target_" in entry for entry in entries)
        return
    raw = OmegaConf.load(CONF / group / f"{option}.yaml")
    if not raw and option == "none":  # an empty option switches the group off
        assert not node
        return
    assert "_target_" in node, f"conf/{group}/{option}.yaml names no _target_"
    get_object(node._target_)


def test_model_options_hold_only_what_differs():
    shared = OmegaConf.load(CONF / "model" / "timm.yaml")
    for option in options("model"):
        if option == "timm":
            continue
        own = OmegaConf.load(CONF / "model" / f"{option}.yaml")
        repeated = [k for k in own if k != "defaults" and k in shared and own[k] == shared[k]]
        assert not repeated, f"conf/model/{option}.yaml repeats {repeated} from timm.yaml"


def own_keys(path) -> dict:
    """A YAML's keys and values, its defaults list left out."""
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return {k: v for k, v in node.items() if k != "defaults"}


def includes_shared(path) -> bool:
    defaults = OmegaConf.load(path).get("defaults") or []
    return any(str(entry).startswith(f"{SHARED_FOLDER}/") for entry in defaults)


def test_data_options_hold_only_what_differs_from_their_shared_settings():
    shared = {}
    for path in (CONF / "data" / SHARED_FOLDER).glob("*.yaml"):
        shared |= own_keys(path)
    assert {"batch_size", "num_workers", "balance", "split_fractions", "cache"} <= set(shared)
    including = [o for o in options("data") if includes_shared(CONF / "data" / f"{o}.yaml")]
    assert {"image_folder", "manifest", "streaming"} <= set(including)
    for option in including:
        own = own_keys(CONF / "data" / f"{option}.yaml")
        repeated = [k for k, v in own.items() if k in shared and v == shared[k]]
        assert not repeated, f"conf/data/{option}.yaml repeats {repeated} from conf/data/{SHARED_FOLDER}/"


@pytest.mark.parametrize("option", options("data"))
def test_every_data_key_is_a_parameter_of_its_datamodule(tmp_path, option):
    node = compose_cfg("train", [f"data={option}", "data.root=/photos"], tmp_path / "run").data
    source = get_object(node._target_)
    parameters = set(inspect.signature(source).parameters) | set(
        inspect.signature(ImageDataModule).parameters
    )
    unknown = sorted(set(node) - parameters - {"_target_"})
    assert not unknown, f"data={option} sets {unknown}, which {source.__name__} does not take"
