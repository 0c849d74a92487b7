"""The commands start light: importing them, composing a config and answering a config mistake load none of
torch, Lightning, torchmetrics, scikit-learn or matplotlib (each task imports its libraries when it runs)."""

import json
import os
import subprocess
import sys

from tests.helpers import ROOT

HEAVY = (
    "torch",
    "pytorch_lightning",
    "lightning",
    "torchmetrics",
    "torchvision",
    "timm",
    "sklearn",
    "matplotlib",
)

# Runs the console scripts' functions in one fresh interpreter, as `train.py ...` / `eval.py ...` would.
MISTAKES = """
import json, sys

HEAVY = {heavy!r}
loaded = {{}}


def heavy():
    return sorted(name for name in HEAVY if name in sys.modules)


def exit_code(command, argv):
    sys.argv = argv
    try:
        command()
    except SystemExit as exited:
        return exited.code
    return 0


import skuvision.cli as cli

loaded["import"] = heavy()
codes = {{
    "renamed key": exit_code(cli.train, ["train.py", "data.image_size=64"]),
    "no ckpt_path": exit_code(cli.evaluate, ["eval.py"]),
    "unknown option": exit_code(cli.train, ["train.py", "model=nosuch"]),
}}
loaded["mistakes"] = heavy()
print(json.dumps({{"loaded": loaded, "codes": codes}}))
"""


def test_the_commands_answer_config_mistakes_without_loading_torch(tmp_path):
    code = MISTAKES.format(heavy=HEAVY)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == {"import": [], "mistakes": []}
    assert report["codes"] == {"renamed key": 2, "no ckpt_path": 2, "unknown option": 1}
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0] == "error: data.image_size is now input.image_size: write input.image_size=64"
    assert errors[1].startswith(
        "error: ckpt_path is not set: give it on the command line, e.g. python eval.py"
    )
    assert "Could not find 'model/nosuch'" in result.stderr
