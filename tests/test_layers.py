"""The import contract of pyproject.toml ([tool.importlinter]): layers and no cycles, in-function imports
included. It holds on the package, and breaks on a copy with one upward import or one cycle planted."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import printed_by

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "skuvision"


def lint_imports(source_root: Path) -> subprocess.CompletedProcess:
    """lint-imports with the project's contracts, on the skuvision package under `source_root`."""
    run = (
        "import sys; from importlinter.cli import lint_imports; "
        f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True))"
    )
    env = {"PYTHONPATH": str(source_root), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-c", run], cwd=source_root, env=env, capture_output=True, text=True, timeout=120
    )


def planted_copy(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the package with `line` added at the end of `module` (a path below skuvision/)."""
    shutil.copytree(PACKAGE, tmp_path / "skuvision", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "skuvision" / module
    target.write_text(target.read_text() + "\n\n" + line + "\n")
    return tmp_path


def test_the_package_keeps_its_import_contract():
    result = lint_imports(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    "module, line, broken",
    [
        # a data module reaching up to a task, inside a function, as lazy imports do
        (
            "data/augment.py",
            "def lazy():\n    from skuvision.tasks.train import train  # noqa\n",
            "skuvision.data is not allowed to import skuvision.tasks",
        ),
        ("compat.py", "from skuvision.errors import SkuvisionError  # noqa", "skuvision.compat"),
        ("audit/report.py", "import skuvision.serving.api  # noqa", "skuvision.audit"),
        ("data/augment.py", "import skuvision.data.datamodule  # noqa", "No cycles are allowed"),
    ],
)
def test_one_planted_import_breaks_it(tmp_path, module, line, broken):
    result = lint_imports(planted_copy(tmp_path, module, line))
    assert result.returncode != 0
    assert broken in result.stdout, result.stdout


def test_the_precision_resolver_and_streaming_workers_load_no_model():
    """`${skuvision.auto_precision:}` and a litdata worker unpickling a sample import what they need, not the
    Classifier or the checkpoint reader."""
    code = (
        "import sys\n"
        "from skuvision.config import auto_precision\n"
        "auto_precision()\n"
        "assert 'pytorch_lightning' not in sys.modules, 'lightning'\n"
        "import skuvision.data.streaming\n"
        "model = ('skuvision.models', 'skuvision.checkpoints')\n"
        "print(sorted(m for m in sys.modules if m.startswith(model)))\n"
    )
    assert printed_by(code) == "[]"
