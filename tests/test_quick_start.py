"""The README's quick start, command by command, on a small generated photo folder (issue 26, Must show 1).

The commands are read from the README's quick-start block, with their overrides as written; the
`outputs/<...>` placeholders are filled from the previous commands' summaries, which is what the test
checks: each summary names the next command's input. Train, eval, predict, embed and export run in this
process (the same config composed from the same overrides, without the import of a new interpreter each);
serve.py runs as a user starts it, on a free port, and answers a photo and the demo page. Only train gets
more: one epoch.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import httpx

from skuvision.tasks.embed import embed
from skuvision.tasks.evaluate import evaluate
from skuvision.tasks.export import export
from skuvision.tasks.predict import predict
from skuvision.tasks.train import train
from tests.helpers import ROOT, compose_cfg
from tests.serving_fixtures import RunningServer
from tests.writers import write_photo_folder

TASKS = {
    "train.py": train,
    "eval.py": evaluate,
    "predict.py": predict,
    "embed.py": embed,
    "export.py": export,
}
FAST = ["trainer.max_epochs=1", "data.num_workers=0", "threads=2"]  # the one change: a short training


def quick_start_commands() -> list[list[str]]:
    """The `python ...` lines of the README's quick-start block, as argument lists."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.startswith("python ")]


def named(summary: str, script: str, key: str) -> str:
    """The value of `key=` in the summary's next command for `script`."""
    found = re.search(rf"python {re.escape(script)} .*?\b{key}=(\S+)", summary)
    assert found, f"the summary names no `python {script} ... {key}=`:\n{summary}"
    return found.group(1)


def test_the_readme_quick_start_runs_as_written(tmp_path, capsys, monkeypatch):
    commands = quick_start_commands()
    assert [c[1] for c in commands] == [
        "train.py",
        "eval.py",
        "predict.py",
        "embed.py",
        "serve.py",
        "export.py",
    ]
    write_photo_folder(tmp_path / "photos", classes=("kettle", "phone", "t_shirt"), per_class=10)
    write_photo_folder(tmp_path / "new_photos", classes=("unsorted",), per_class=3, seed=7)
    monkeypatch.chdir(tmp_path)  # the commands' relative paths (photos, outputs/...) are the user's
    filled: dict[str, str] = {}
    for k, (_, script, *overrides) in enumerate(commands):
        overrides = [fill(o, filled) for o in overrides]
        if script == "serve.py":
            check_serving(overrides, tmp_path)
            continue
        cfg = compose_cfg(
            script.removesuffix(".py"),
            overrides + (FAST if script == "train.py" else []),
            tmp_path / "outputs" / f"{k}-{script.removesuffix('.py')}",
        )
        capsys.readouterr()
        TASKS[script](cfg)
        summary = capsys.readouterr().out
        if script == "train.py":
            filled["outputs/<run>"] = named(summary, "eval.py", "ckpt_path")
            assert named(summary, "predict.py", "ckpt_path") == filled["outputs/<run>"]
        elif script == "eval.py":
            filled["outputs/<eval-run>"] = named(summary, "predict.py", "calibration")
        elif script == "predict.py":
            out = Path(cfg.paths.output_dir)
            assert (out / "predictions.csv").is_file() and (out / "predictions.html").is_file()
            assert "predictions.html" in summary
        elif script == "embed.py":
            filled["outputs/<embed-run>"] = named(summary, "serve.py", "index")
        elif script == "export.py":
            onnx = named(summary, "serve.py", "serve.onnx_path")
            assert Path(onnx).is_file() and (Path(onnx).parent / "README.md").is_file()
    assert set(filled) == {"outputs/<run>", "outputs/<eval-run>", "outputs/<embed-run>"}


def fill(override: str, filled: dict[str, str]) -> str:
    for placeholder, value in filled.items():
        override = override.replace(placeholder, value)
    assert "<" not in override, f"{override}: no earlier summary named this"
    return override


def check_serving(overrides: list[str], cwd: Path) -> None:
    """serve.py as written (plus a free port): a photo gets a label and similar items; the demo page loads."""
    server = RunningServer(overrides, cwd, "serve")
    try:
        server.wait_healthy()
        photo = next((cwd / "new_photos" / "unsorted").iterdir())
        with open(photo, "rb") as f:
            answer = httpx.post(server.url + "/predict", files={"file": (photo.name, f)}, timeout=60)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["labels"][0]["label"] in {"kettle", "phone", "t_shirt"} and body.get("similar"), body
        assert httpx.get(server.url + "/demo", timeout=60, follow_redirects=True).status_code == 200
    finally:
        server.stop()
