"""The command-line path from training to a served model: ckpt_path takes a run folder, every task ends with a
summary naming the next command's input, export writes a model card that agrees with eval.py and files of
ordinary modes, --help shows a task's own keys, a Trainer typo is one line."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import string
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from skuvision.checkpoints import checkpoint_file
from skuvision.errors import SkuvisionError
from tests.helpers import compose_cfg


def hydra_value(word: str) -> tuple[str, object]:
    """A command's `key=value` word (as the shell split it) as Hydra hands it to the task."""
    (override,) = OverridesParser.create().parse_overrides([word])
    return override.key_or_group, override.value()


def next_commands(text: str) -> list[list[str]]:
    """The commands of a summary's `next:` lines, split as the shell splits them."""
    lines = text.split("next:", 1)[1].splitlines() if "next:" in text else []
    return [shlex.split(line.strip()) for line in lines if line.strip()]


def arguments(words: list[str]) -> dict:
    """A command's overrides, its placeholders (input=<photos>) left out."""
    return dict(hydra_value(w) for w in words[2:] if "=" in w and not w.split("=", 1)[1].startswith("<"))


@pytest.fixture
def run_copy(serve_checkpoint, tmp_path) -> Path:
    """A copy of a trained run folder (metrics.json records the original's absolute checkpoint path),
    without the exports other tests put beside its checkpoints."""
    copy = tmp_path / "my run"
    strays = shutil.ignore_patterns("model.onnx", "model.onnx.data", "model.json", "README.md")
    shutil.copytree(serve_checkpoint.parent.parent, copy, ignore=strays)
    return copy


def test_a_run_folder_is_its_tested_checkpoint_found_by_name_inside_it(run_copy):
    recorded = json.loads((run_copy / "metrics.json").read_text())["checkpoint"]
    assert not recorded.startswith(str(run_copy))  # the record names the original folder's file
    tested = run_copy / "checkpoints" / Path(recorded).name
    assert checkpoint_file(run_copy) == tested
    assert checkpoint_file(run_copy / "checkpoints") == tested
    file = next(p for p in (run_copy / "checkpoints").glob("*.ckpt") if p != tested)
    assert checkpoint_file(file) == file  # a file is taken as given
    for empty in ("", " ", None):  # never the working folder
        with pytest.raises(SkuvisionError, match="ckpt_path is empty"):
            checkpoint_file(empty)


def test_a_wrong_path_lists_the_checkpoints_nearby(run_copy):
    names = sorted(p.name for p in (run_copy / "checkpoints").glob("*.ckpt"))
    with pytest.raises(SkuvisionError) as raised:
        checkpoint_file(run_copy / "checkpoints" / "best.ckpt")
    assert str(raised.value).startswith(f"ckpt_path={run_copy / 'checkpoints' / 'best.ckpt'}: no such")
    assert all(name in str(raised.value) for name in names) and "\n" not in str(raised.value)
    with pytest.raises(SkuvisionError) as raised:  # a typo in the run folder: its siblings' checkpoints
        checkpoint_file(run_copy.with_name("my rn"))
    assert all(f"my run/checkpoints/{name}" in str(raised.value) for name in names)


def test_several_checkpoints_and_no_record_choose_nothing(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("best-epoch01-acc0.5000.ckpt", "last.ckpt"):
        (run / "checkpoints" / name).write_bytes(b"")
    with pytest.raises(SkuvisionError, match="2 checkpoints and no tested one recorded") as raised:
        checkpoint_file(run)
    assert "best-epoch01-acc0.5000.ckpt" in str(raised.value) and "last.ckpt" in str(raised.value)
    # A record naming a file elsewhere (or climbing out) is looked up by name in this folder, never followed.
    outside = tmp_path / "elsewhere" / "checkpoints" / "planted.ckpt"
    outside.parent.mkdir(parents=True)
    outside.write_bytes(b"")
    for record in (str(outside), "../../elsewhere/checkpoints/planted.ckpt", ".."):
        (run / "metrics.json").write_text(json.dumps({"checkpoint": record}))
        with pytest.raises(SkuvisionError, match="not in"):
            checkpoint_file(run)
    (run / "metrics.json").write_text(json.dumps({"checkpoint": "/somewhere/else/last.ckpt"}))
    assert checkpoint_file(run) == run / "checkpoints" / "last.ckpt"
    (run / "checkpoints" / "last.ckpt").unlink()
    (run / "metrics.json").unlink()
    assert checkpoint_file(run) == run / "checkpoints" / "best-epoch01-acc0.5000.ckpt"  # the only one


def test_no_ckpt_path_is_one_line_with_a_run_folder_example(tmp_path, capsys):
    from skuvision.tasks.export import export
    from skuvision.tasks.utils import run_cli as run_task

    with pytest.raises(SystemExit) as exited:
        run_task(export, compose_cfg("export", [], tmp_path / "run"))
    assert exited.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ckpt_path is not set: give it on the command line, e.g. python export.py ")
    assert "ckpt_path=outputs/<date>/<time> (a train.py run folder" in line


def test_summary_commands_carry_awkward_paths_whole(tmp_path, monkeypatch, capsys):
    from skuvision.tasks.utils import command, print_summary

    monkeypatch.chdir(tmp_path)
    odd = tmp_path / "shop's photos, 2026" / "run [1]=x ~#é"
    text = print_summary("demo", [odd / "a.csv"], {"n": 3}, [command("serve.py", f"ckpt_path={odd}", "k=5")])
    assert capsys.readouterr().out.strip() == text
    assert "shop's photos, 2026/run [1]=x ~#é/a.csv" in text  # relative to the working folder
    ((python, script, *words),) = next_commands(text)
    assert (python, script) == ("python", "serve.py")
    assert dict(hydra_value(w) for w in words) == {"ckpt_path": str(odd), "k": 5}


def test_train_and_embed_summaries_name_the_next_steps_input(run_copy, tmp_path, capsys, monkeypatch):
    from skuvision.tasks.embed import embed_summary
    from skuvision.tasks.train import train_summary

    monkeypatch.chdir(tmp_path)
    metrics = json.loads((run_copy / "metrics.json").read_text())
    tested = run_copy / "checkpoints" / Path(metrics["checkpoint"]).name
    text = train_summary(run_copy, metrics, str(tested), str(tested))
    scripts = [words[1] for words in next_commands(text)]
    assert scripts == ["eval.py", "predict.py", "serve.py"]
    for words in next_commands(text):
        assert checkpoint_file(arguments(words)["ckpt_path"]).resolve() == tested
    assert f"test/acc {metrics['test/acc']:.4f}" in text and str(tested.relative_to(tmp_path)) in text
    # No tested checkpoint recorded (test=false): the command names a file, which needs no record.
    text = train_summary(run_copy, metrics, None, str(tested))
    assert arguments(next_commands(text)[0])["ckpt_path"] == str(tested.relative_to(tmp_path))

    embed_run = tmp_path / "embed run"
    written = {n: embed_run / n for n in ("embeddings.npz", "index", "neighbours.csv", "retrieval.json")}
    (embed_run / "index").mkdir(parents=True)
    cfg = SimpleNamespace(ckpt_path=str(tested))
    text = embed_summary(cfg, written, {"index_info": {"count": 7}})
    ((_, script, *words),) = next_commands(text)
    assert script == "serve.py" and arguments(["python", script, *words])["index"] == "embed run"
    assert "items 7" in capsys.readouterr().out


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_export_of_a_run_folder_writes_a_card_that_agrees_with_eval_and_serve_finds_it(
    run_copy, tmp_path, capsys, monkeypatch
):
    """Must show 5: the card's test figures and classes are eval.py's for the same checkpoint; export's
    summary names a serve command that works, and serve finds the run's export by itself."""
    from skuvision.tasks.evaluate import evaluate
    from skuvision.tasks.export import export
    from skuvision.tasks.serve import prepared

    monkeypatch.chdir(tmp_path)
    cpu = ["trainer.accelerator=cpu", "trainer.precision=32"]
    out = run_copy / "model.onnx"
    overrides = [f"ckpt_path={run_copy}", f"output={out}", "check_images=8", "batch_size=4", *cpu]
    export(compose_cfg("export", overrides, tmp_path / "export"))
    export_text = capsys.readouterr().out
    evaluate(compose_cfg("eval", [f"ckpt_path={run_copy}", *cpu], tmp_path / "eval"))
    eval_text = capsys.readouterr().out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    tested = checkpoint_file(run_copy)
    assert metrics["checkpoint"] == str(tested)

    card = (run_copy / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "onnx" and "image-classification" in meta["tags"]
    (result,) = meta["model-index"][0]["results"]
    on_card = {m["name"]: m["value"] for m in result["metrics"]}
    reported = {k: v for k, v in metrics.items() if k.startswith("test/") and k != "test/num_images"}
    assert on_card == reported
    classes = [line.split(" | ")[0].lstrip("| ") for line in card.split("Per class")[1].splitlines()[4:]]
    assert classes[: len(metrics["per_class"])] == list(metrics["per_class"])
    for name in ("model.onnx.data", "## Data", "## Training recipe", "## Known limits", "## Calibration"):
        assert name in card
    mask = os.umask(0)
    os.umask(mask)
    for written in (out, out.with_name("model.onnx.data"), out.with_suffix(".json"), run_copy / "README.md"):
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~mask, written

    (serve_words,) = next_commands(export_text)
    given = arguments(serve_words)
    assert given["serve.backend"] == "onnx" and Path(given["serve.onnx_path"]).resolve() == out
    for ckpt_path, onnx_path in ((given["ckpt_path"], given["serve.onnx_path"]), (str(run_copy), None)):
        cfg = compose_cfg("serve", [f"ckpt_path={ckpt_path}", "serve.backend=onnx"], tmp_path / "serve")
        cfg.serve.onnx_path = onnx_path
        card_served, _, _ = prepared(cfg)
        assert (
            Path(card_served.onnx_path).resolve() == out and Path(card_served.checkpoint).resolve() == tested
        )

    (predict_words,) = next_commands(eval_text)
    assert predict_words[1] == "predict.py"
    assert (Path(arguments(predict_words)["calibration"]) / "calibration.json").is_file()


def test_a_found_export_of_another_checkpoint_is_refused(run_copy, tmp_path):
    from skuvision.serving.predictor import find_onnx

    tested = checkpoint_file(run_copy)
    other = next(p for p in (run_copy / "checkpoints").glob("*.ckpt") if p != tested)
    (run_copy / "model.onnx").write_bytes(b"")
    (run_copy / "model.json").write_text(json.dumps({"checkpoint": str(other)}))
    with pytest.raises(SkuvisionError, match=f"exported from {other.name}, not ckpt_path="):
        find_onnx(tested, None)
    assert find_onnx(other, None) == run_copy / "model.onnx"


def test_export_never_replaces_a_readme_in_its_folder(serve_checkpoint, tmp_path):
    from skuvision.tasks.export import export

    folder = tmp_path / "shipped"
    folder.mkdir()
    (folder / "README.md").write_text("ours\n")
    cfg = compose_cfg(
        "export", [f"ckpt_path={serve_checkpoint}", f"output={folder / 'model.onnx'}"], tmp_path / "e"
    )
    with pytest.raises(SkuvisionError, match="README.md exists"):
        export(cfg)
    assert (
        sorted(p.name for p in folder.iterdir()) == ["README.md"]
        and (folder / "README.md").read_text() == "ours\n"
    )


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_private_file_a_writer_makes_gets_the_umasks_mode(tmp_path, umask):
    import torch
    from safetensors.torch import save_file

    from skuvision.outputs import new_folder

    before = os.umask(umask)
    try:
        with new_folder(tmp_path / "out") as partial:
            save_file({"w": torch.zeros(2)}, str(partial / "model.safetensors"))  # safetensors writes 0600
            (partial / "config.json").write_text("{}")
    finally:
        os.umask(before)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o666 & ~umask


def test_a_trainer_key_typo_is_one_line_with_the_likely_key(tmp_path):
    from skuvision.assembly import check_trainer_keys

    cfg = compose_cfg("train", ["+trainer.max_epoch=1"], tmp_path / "run")
    with pytest.raises(SkuvisionError, match=r"trainer.max_epoch is not an argument .* trainer.max_epochs\?"):
        check_trainer_keys(cfg.trainer)
    check_trainer_keys(compose_cfg("train", ["+trainer.max_time=00:00:10:00"], tmp_path / "ok").trainer)


def test_own_keys_of_each_task_come_from_its_yaml():
    from skuvision.config import own_keys

    for task, keys in {
        "eval": ["ckpt_path:", "calibrate:"],
        "predict": ["ckpt_path:", "input:", "calibration:"],
        "embed": ["ckpt_path:", "index:"],
        "export": ["ckpt_path:", "format:", "calibration:"],
        "audit": ["ckpt_path:", "audit:"],
        "serve": ["ckpt_path:", "index:", "serve:"],
        "demo": ["ckpt_path:", "port: 7860"],
    }.items():
        text = own_keys(task)
        assert all(k in text for k in keys), (task, text)
        assert "hydra:" not in text and "task_name" not in text and "defaults:" not in text


@pytest.mark.parametrize("task", ["eval", "predict", "embed", "export", "audit", "serve", "demo"])
def test_help_lists_the_tasks_keys_before_the_groups(task, tmp_path):
    """The help Hydra prints: its template as composed for the task, filled as Hydra fills it
    (string.Template; `predict.py --help` in a shell shows the same). Not through hydra.main in this process:
    it would reconfigure logging for the tests after it."""
    cfg = compose_cfg(task, [], tmp_path / "run")
    fill = {"FLAGS_HELP": "", "HYDRA_CONFIG_GROUPS": "", "APP_CONFIG_GROUPS": "<groups>", "CONFIG": ""}
    out = string.Template(cfg.hydra.help.template).substitute(fill)
    assert out.startswith(f"python {task}.py key=value")
    assert out.index("ckpt_path: ???") < out.index("<groups>")
    if task == "predict":
        assert out.index("ckpt_path: ???") < out.index("input: null") < out.index("split: null")
        assert out.index("split: null") < out.index("== Config groups")
        assert "A folder (searched recursively)" in out  # the YAML's comments come along
