"""skuvision as a user installs it: a wheel built from this checkout, installed into a folder outside it, runs
its console scripts from a third folder with the configs it ships; a user's own config folder joins them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.helpers import CONF, ROOT, quick_overrides, run_cli

COMMANDS = ("train", "eval", "predict", "embed", "export", "serve", "demo", "audit", "compare", "shard")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from the checkout's sources, offline, with the venv's setuptools. It builds in a
    copy: setuptools writes build/ and *.egg-info beside the sources it reads."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    leftovers = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "conf", source / "conf", ignore=leftovers)
    # symlinks=True: src/skuvision/conf stays the link to conf/ that git checks out.
    shutil.copytree(ROOT / "src", source / "src", symlinks=True, ignore=leftovers)
    pip(["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(work / "dist"), str(source)])
    (built,) = (work / "dist").glob("skuvision-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel installed into a plain folder, away from the checkout; its console scripts land in bin/."""
    target = tmp_path_factory.mktemp("site")
    pip(["install", "--no-deps", "--target", str(target), str(wheel)])
    return target


def pip(args: list[str]) -> None:
    command = [sys.executable, "-m", "pip", *args, "--no-index", "--quiet", "--disable-pip-version-check"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def in_site(site: Path, command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A command in an environment whose skuvision is the installed wheel: PYTHONPATH is the install folder
    alone (the checkout's src/ is not on it), run from cwd."""
    env = {**os.environ, "PYTHONPATH": str(site), "SKUVISION_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_the_wheel_holds_every_config_the_sweeper_plugin_and_the_console_scripts(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    shipped = {n.removeprefix("skuvision/conf/") for n in names if n.startswith("skuvision/conf/")}
    in_checkout = {str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml")}
    assert "train.yaml" in in_checkout and "model/simple_cnn.yaml" in in_checkout
    assert in_checkout <= shipped
    assert "skuvision/conf/__init__.py" in names  # Hydra reads pkg:// sources only from packages
    assert "hydra_plugins/skuvision_sweepers/__init__.py" in names
    for name in COMMANDS:
        assert f"skuvision-{name} = skuvision.cli:" in scripts


# Where skuvision comes from in the installed environment, and what else could have supplied it: this venv
# also has the checkout installed editable (a .pth line, which site.py appends to sys.path after PYTHONPATH's
# entries, or setuptools' editable finder, which it appends to sys.meta_path after the path finder).
WHERE_FROM = """
import json, os, sys
import hydra_plugins.skuvision_sweepers, skuvision
from skuvision.config import CONF_DIR
others = [p for p in sys.path if os.path.isfile(os.path.join(p, "skuvision", "__init__.py"))]
finders = [getattr(f, "__name__", type(f).__name__) for f in sys.meta_path]
print(json.dumps({
    "skuvision": skuvision.__file__,
    "conf": str(CONF_DIR),
    "sweepers": hydra_plugins.skuvision_sweepers.__file__,
    "candidates": others,
    "finders": finders,
}))
"""


@pytest.mark.slow
def test_the_installed_wheel_trains_from_another_folder_with_its_own_code_and_configs(
    site, data_root, tmp_path
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    probe = in_site(site, [sys.executable, "-c", WHERE_FROM], elsewhere)
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout)
    assert Path(found["skuvision"]) == site / "skuvision" / "__init__.py"
    assert Path(found["conf"]) == site / "skuvision" / "conf"
    assert Path(found["sweepers"]).is_relative_to(site)
    # The install folder is the first place on the path that holds skuvision: an editable install's entry
    # (the checkout's src/) comes after it, and any editable finder only after the path finder.
    assert Path(found["candidates"][0]) == site
    editable = [i for i, name in enumerate(found["finders"]) if "editable" in name.lower()]
    assert all(i > found["finders"].index("PathFinder") for i in editable)

    train = [str(site / "bin" / "skuvision-train"), "debug=fast"]
    result = in_site(site, [*train, *quick_overrides("fashion_mnist", data_root)], elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [p for p in (elsewhere / "outputs").glob("*/*") if p.is_dir()]
    assert json.loads((run / "metrics.json").read_text())["test/acc"] >= 0
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "train.log").is_file()
    assert yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["name"] == "train"


def user_config_dir(tmp_path: Path) -> Path:
    """A user's own folder of configs: a model option that builds on the shipped `timm` one."""
    folder = tmp_path / "my_conf"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "my_model.yaml").write_text("defaults:\n  - timm\n  - _self_\n\nname: resnet34\n")
    return folder


def assert_composes_the_users_model(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    model = yaml.safe_load(result.stdout)["model"]
    assert model["name"] == "resnet34"
    assert model["_target_"] == "skuvision.models.create_backbone"  # from the shipped model/timm.yaml


@pytest.mark.slow
def test_a_users_config_dir_joins_the_installed_configs(site, tmp_path):
    command = [str(site / "bin" / "skuvision-train"), "--config-dir", str(user_config_dir(tmp_path))]
    result = in_site(site, [*command, "model=my_model", "--cfg", "job"], tmp_path)
    assert_composes_the_users_model(result)


def test_a_users_config_dir_joins_the_checkouts_configs(tmp_path):
    overrides = ["--config-dir", str(user_config_dir(tmp_path)), "model=my_model", "--cfg", "job"]
    assert_composes_the_users_model(run_cli("train.py", overrides, tmp_path))
