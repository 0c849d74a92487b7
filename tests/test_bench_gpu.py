"""bench/gpu.py on a machine without a GPU: its arguments and the plan a GPU run would measure (--dry-run)."""

import pytest

from bench import gpu


def dry_run(capsys, *argv) -> list[str]:
    gpu.main(["--dry-run", *argv])
    return capsys.readouterr().out.splitlines()


def test_the_plan_pairs_each_model_with_the_plain_loop_and_runs_compile_ddp_and_embed(capsys):
    lines = dry_run(capsys)
    steps = [line for line in lines if line.startswith("steps ") and "variant" not in line]
    assert [line.split(":")[0] for line in steps] == ["steps ResNet-50", "steps ViT-B/16"]
    assert all("EMA on both" in line and "input.image_size=224" in line for line in steps)
    assert "model.name=vit_base_patch16_224" in steps[1]
    assert any(line.endswith("model.compile=true") for line in lines)
    ddp = [line for line in lines if line.startswith("ddp ")]
    assert len(ddp) == 2 and "trainer.devices=1" in ddp[0] and "trainer.devices=2" in ddp[1]
    # the batch per process stays the same: the global batch grows with the processes
    assert "data.batch_size=16 " in ddp[0] and "data.batch_size=32 " in ddp[1]
    assert any(line.startswith("embed:") and "decode_on=gpu vs cpu" in line for line in lines)


def test_parts_and_sizes_choose_what_runs(capsys):
    lines = dry_run(capsys, "--parts", "embed", "--photos", "100", "--workers", "3")
    assert lines == [line for line in lines if line.startswith("embed:")] and "100 photos" in lines[0]
    assert "3 workers" in lines[0]
    with pytest.raises(SystemExit, match="unknown part"):
        gpu.main(["--dry-run", "--parts", "steps,nonsense"])


def test_without_a_gpu_a_real_run_measures_nothing_and_says_so(tmp_path):
    rows, notes = gpu.bench_rows(tmp_path)
    assert rows == [] and "no CUDA device" in notes[0]
