"""Fine-tuning strategies: what is frozen stays bit-identical, every group's LR is what the config says,
gradual unfreezing happens at its epochs, and a resumed run ends where an uninterrupted one does."""

import math

import pytest
import torch
from pytorch_lightning import Callback, seed_everything
from pytorch_lightning.callbacks import ModelCheckpoint

from skuvision.assembly import build, build_trainer, instantiate_callbacks
from skuvision.finetune import stage_param_names
from tests.helpers import ROOT, compose_cfg, quick_overrides, run_cli

STRATEGIES = sorted(p.stem for p in (ROOT / "conf" / "finetune").glob("*.yaml"))
SCHEDULERS = sorted(p.stem for p in (ROOT / "conf" / "scheduler").glob("*.yaml"))
# Epoch-0 frozen stages for a model with 5 stages (simple_cnn: stem, 3 blocks, head) or 6 (resnet18).
FROZEN_AT_START = {
    "full": lambda n: [],
    "linear_probe": lambda n: list(range(n - 1)),
    "freeze_stages": lambda n: [0, 1],
    "gradual": lambda n: list(range(n - 1)),
    "discriminative": lambda n: [],
}


def test_every_strategy_is_covered():
    assert set(STRATEGIES) == set(FROZEN_AT_START)
    assert {"onecycle", "cosine", "step", "plateau", "none"} <= set(SCHEDULERS)


def setup_run(tmp_path, data_root, overrides, model="simple_cnn"):
    """Composed config, DataModule, Classifier and a Trainer exactly as tasks.train builds them."""
    base = quick_overrides("fashion_mnist", data_root, model) + [
        "trainer.limit_val_batches=2",
        "trainer.num_sanity_val_steps=0",
        "trainer.precision=32",
        "trainer.deterministic=true",
        "callbacks.lr_monitor=null",
    ]
    cfg = compose_cfg("train", base + overrides, tmp_path / "run")
    seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg)
    return cfg, datamodule, module


def make_trainer(cfg, extra_callbacks=(), **kwargs):
    callbacks = instantiate_callbacks(cfg.callbacks) + list(extra_callbacks)
    if kwargs.get("enable_checkpointing") is False:
        callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
    return build_trainer(cfg, callbacks=callbacks, **kwargs)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.backbone.state_dict().items()}


def stage_of(module):
    """Backbone state-dict key -> stage index (BatchNorm buffers go with their module's weights)."""
    stages = stage_param_names(module.backbone)
    owner = {name: i for i, names in enumerate(stages) for name in names}
    result = {}
    for key in module.backbone.state_dict():
        prefix = key.rsplit(".", 1)[0]
        result[key] = owner.get(key, owner.get(prefix + ".weight"))
    return result


@pytest.mark.parametrize("strategy", sorted(FROZEN_AT_START))
def test_frozen_weights_and_bn_stats_stay_bit_identical(tmp_path, data_root, strategy):
    cfg, datamodule, module = setup_run(
        tmp_path,
        data_root,
        [f"finetune={strategy}", "trainer.max_epochs=1", "trainer.limit_train_batches=4"],
        model="resnet18",
    )
    num_stages = len(stage_param_names(module.backbone))
    frozen = set(FROZEN_AT_START[strategy](num_stages))
    before = snapshot(module)
    make_trainer(cfg).fit(module, datamodule=datamodule)
    after = snapshot(module)
    owners = stage_of(module)
    checked = {"frozen": 0, "trained": 0}
    for key, old in before.items():
        if key.endswith("num_batches_tracked"):
            continue
        if owners[key] in frozen:
            assert torch.equal(old, after[key]), f"{strategy}: frozen {key} changed"
            checked["frozen"] += 1
        else:
            assert not torch.equal(old, after[key]), f"{strategy}: trainable {key} did not change"
            checked["trained"] += 1
    assert checked["trained"] > 0 and (checked["frozen"] > 0) == bool(frozen)
    # BatchNorm running statistics of frozen stages are included above (running_mean/var keys).
    assert any(k.endswith("running_mean") and owners[k] in frozen for k in before) == bool(frozen)


def test_train_bn_lets_frozen_batchnorm_update_its_statistics(tmp_path, data_root):
    cfg, datamodule, module = setup_run(
        tmp_path,
        data_root,
        [
            "finetune=linear_probe",
            "finetune.train_bn=true",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
        ],
    )
    before = snapshot(module)
    make_trainer(cfg).fit(module, datamodule=datamodule)
    after = snapshot(module)
    head = set(stage_param_names(module.backbone)[-1])
    stats = [k for k in before if k.endswith("running_mean")]
    weights = [k for k in before if k.endswith("weight") and k not in head]
    assert all(not torch.equal(before[k], after[k]) for k in stats)
    assert all(torch.equal(before[k], after[k]) for k in weights)


class LRRecorder(Callback):
    """Each group's LR at the start of every epoch, by group name."""

    def __init__(self):
        self.lrs: list[dict[str, float]] = []
        self.stage: dict[str, int] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        groups = trainer.optimizers[0].param_groups
        self.lrs.append({g["name"]: g["lr"] for g in groups})
        self.stage = {g["name"]: g["stage"] for g in groups}


def expected_factor(scheduler: str, epoch: int, steps_per_epoch: int, epochs: int, cfg) -> float | None:
    """The schedule's multiplier at the start of `epoch`, from the config's own numbers (None: not fixed)."""
    s = cfg.scheduler
    total = steps_per_epoch * epochs
    step = epoch * steps_per_epoch
    if scheduler == "none":
        return 1.0
    if scheduler == "step":
        return s.gamma ** (epoch // s.step_size)
    if scheduler == "cosine":
        warmup = max(1, round(s.warmup_fraction * total))
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / (total - warmup)
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if scheduler == "onecycle":
        start, peak_step = 1 / s.div_factor, s.pct_start * total - 1
        final = start / s.final_div_factor
        if step <= peak_step:
            pct = step / peak_step
            return 1 + (start - 1) / 2 * (math.cos(math.pi * pct) + 1)
        pct = (step - peak_step) / (total - 1 - peak_step)
        return final + (1 - final) / 2 * (math.cos(math.pi * pct) + 1)
    return None  # plateau: depends on the monitored metric


def configured_scale(strategy: str, stage: int, num_stages: int, cfg) -> float:
    head = stage == num_stages - 1
    scale = cfg.finetune.head_lr_scale if head else 1.0
    if strategy == "discriminative":  # simple_cnn: one timm layer per stage, the head at the top
        scale *= cfg.finetune.layer_decay ** (num_stages - 1 - stage)
    return scale


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("strategy", sorted(FROZEN_AT_START))
def test_every_group_lr_follows_config(tmp_path, data_root, strategy, scheduler):
    epochs, steps = 4, 3
    extra = [
        f"finetune={strategy}",
        f"scheduler={scheduler}",
        "finetune.head_lr_scale=3.0",
        f"trainer.max_epochs={epochs}",
        f"trainer.limit_train_batches={steps}",
        "optimizer.lr=0.01",
    ]
    if scheduler == "step":
        extra += ["scheduler.step_size=2", "scheduler.gamma=0.5"]
    if strategy == "gradual":
        extra += ["finetune.unfreeze_at=[1,2]"]
    cfg, datamodule, module = setup_run(tmp_path, data_root, extra)
    recorder = LRRecorder()
    make_trainer(cfg, [recorder], enable_checkpointing=False).fit(module, datamodule=datamodule)
    assert len(recorder.lrs) == epochs
    num_stages = len(stage_param_names(module.backbone))
    for epoch, lrs in enumerate(recorder.lrs):
        factor = expected_factor(scheduler, epoch, steps, epochs, cfg)
        if factor is None:  # plateau: one common factor for all groups, starting at 1
            first = next(iter(lrs))
            scale = configured_scale(strategy, recorder.stage[first], num_stages, cfg)
            factor = lrs[first] / (cfg.optimizer.lr * scale)
            assert factor == pytest.approx(1.0) if epoch == 0 else factor <= 1.0
        for name, lr in lrs.items():
            scale = configured_scale(strategy, recorder.stage[name], num_stages, cfg)
            assert lr == pytest.approx(cfg.optimizer.lr * scale * factor, rel=1e-6), (epoch, name)


class StageChanges(Callback):
    """Which stages' parameters changed during each epoch."""

    def __init__(self):
        self.changed: list[set[int]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.before = snapshot(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        owners = stage_of(pl_module)
        after = snapshot(pl_module)
        self.changed.append(
            {owners[k] for k in after if k.endswith("weight") and not torch.equal(self.before[k], after[k])}
        )


def test_gradual_unfreezes_each_stage_at_its_epoch(tmp_path, data_root):
    cfg, datamodule, module = setup_run(
        tmp_path,
        data_root,
        [
            "model.kwargs.widths=[32,64,128]",  # stem and three stages below the head
            "finetune=gradual",
            "finetune.unfreeze_at=[1,2,3]",
            "trainer.max_epochs=5",
            "trainer.limit_train_batches=2",
        ],
    )
    probe = StageChanges()
    make_trainer(cfg, [probe], enable_checkpointing=False).fit(module, datamodule=datamodule)
    # simple_cnn: stages 0..3 below the head (4). Stage 3 unfreezes at epoch 1, stage 2 at 2, the rest at 3.
    unfreeze_epoch = {4: 0, 3: 1, 2: 2, 1: 3, 0: 3}
    for epoch, changed in enumerate(probe.changed):
        assert changed == {s for s, e in unfreeze_epoch.items() if epoch >= e}, epoch


class StopAt(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated kill")


def test_resume_mid_gradual_ends_like_an_uninterrupted_run(tmp_path, data_root):
    overrides = [
        "model.kwargs.widths=[32,64,128]",  # stem and three stages below the head
        "finetune=gradual",
        "finetune.unfreeze_at=[1,3]",
        "trainer.max_epochs=4",
        "trainer.limit_train_batches=3",
        "augment=basic",
    ]
    cfg, datamodule, module = setup_run(tmp_path / "a", data_root, overrides)
    make_trainer(cfg).fit(module, datamodule=datamodule)
    uninterrupted = snapshot(module)

    cfg, datamodule, module = setup_run(tmp_path / "b", data_root, overrides)
    with pytest.raises(RuntimeError, match="simulated kill"):
        make_trainer(cfg, [StopAt(2)]).fit(module, datamodule=datamodule)
    last = tmp_path / "b" / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 1
    assert "averaging_state" in state  # the weight EMA is on, and resumes with the run
    assert any(v == {"frozen": [0, 1, 2]} for k, v in state["callbacks"].items() if "Gradual" in k)

    cfg, datamodule, module = setup_run(tmp_path / "c", data_root, overrides)
    make_trainer(cfg).fit(module, datamodule=datamodule, ckpt_path=str(last))
    resumed = snapshot(module)
    for key, value in uninterrupted.items():
        assert torch.equal(value, resumed[key]), key


def test_lr_finder_keeps_group_ratios(tmp_path, data_root):
    from skuvision.tasks.train import find_lr

    cfg, datamodule, module = setup_run(
        tmp_path,
        data_root,
        [
            "finetune=discriminative",
            "finetune.head_lr_scale=2.0",
            "lr_find.num_training=15",
            "trainer.max_epochs=1",
        ],
    )
    head_before = module.backbone.fc.weight.detach().clone()
    base_lr = find_lr(cfg, module, datamodule)
    assert torch.equal(head_before, module.backbone.fc.weight)  # the sweep's steps are undone
    assert module.hparams.optimizer["lr"] == base_lr
    recorder = LRRecorder()
    trainer = make_trainer(cfg, [recorder], enable_checkpointing=False, limit_train_batches=1)
    cfg.scheduler = None
    module.hparams.scheduler = None
    trainer.fit(module, datamodule=datamodule)
    num_stages = len(stage_param_names(module.backbone))
    for name, lr in recorder.lrs[0].items():
        assert lr == pytest.approx(
            base_lr * configured_scale("discriminative", recorder.stage[name], num_stages, cfg)
        )


@pytest.mark.slow
def test_ddp_gradual_ranks_agree(tmp_path, data_root):
    overrides = quick_overrides("fashion_mnist", data_root) + [
        "finetune=gradual",
        "finetune.unfreeze_at=[1]",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.strategy=ddp_spawn",
        "trainer.devices=2",
        "trainer.precision=32",
        "+callbacks.rank_probe._target_=tests.probes.FrozenStateProbe",
        "threads=1",
    ]
    result = run_cli("train.py", overrides, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1
    reports = sorted(runs[0].glob("frozen_rank*.json"))
    assert [p.name for p in reports] == ["frozen_rank0.json", "frozen_rank1.json"]
    import json

    rank0, rank1 = (json.loads(p.read_text()) for p in reports)
    assert rank0 == rank1
    assert rank0["0"] != rank0["1"]  # epoch 0 head only, epoch 1 everything


@pytest.mark.slow
def test_sweep_over_strategies_records_each(tmp_path, data_root):
    overrides = ["-m", *quick_overrides("fashion_mnist", data_root)] + [
        "finetune=full,linear_probe,gradual,discriminative",
        "trainer.fast_dev_run=true",
    ]
    result = run_cli("train.py", overrides, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    configs = sorted((tmp_path / "multirun").glob("*/*/*/.hydra/config.yaml"))
    assert len(configs) == 4
    targets = {c.read_text().split("finetune:\n  _target_: ")[1].split("\n")[0] for c in configs}
    assert targets == {
        "skuvision.finetune.Full",
        "skuvision.finetune.LinearProbe",
        "skuvision.finetune.Gradual",
        "skuvision.finetune.Discriminative",
    }


def test_norms_and_biases_get_no_weight_decay(tmp_path, data_root):
    _, _, module = setup_run(
        tmp_path, data_root, ["finetune=discriminative", "optimizer=sgd"], model="resnet18"
    )
    groups = module.finetune.param_groups(module.backbone, lr=0.1, weight_decay=5e-4)
    names = {name: p for name, p in module.backbone.named_parameters()}
    seen = set()
    for group in groups:
        for name in group["param_names"]:
            one_dim = names[name].ndim <= 1
            assert group["weight_decay"] == (0.0 if one_dim else 5e-4), name
            seen.add(name)
    assert seen == set(names)  # every parameter is in exactly one group from the start
    assert sum(len(g["params"]) for g in groups) == len(names)


@pytest.mark.parametrize("scheduler", ["onecycle", "step"])
def test_sgd_groups_follow_config_through_a_gradual_unfreeze(tmp_path, data_root, scheduler):
    epochs, steps = 3, 3
    extra = [
        "finetune=gradual",
        "finetune.unfreeze_at=[1]",
        "finetune.head_lr_scale=5.0",
        "optimizer=sgd",
        f"scheduler={scheduler}",
        f"trainer.max_epochs={epochs}",
        f"trainer.limit_train_batches={steps}",
    ]
    if scheduler == "step":
        extra += ["scheduler.step_size=1", "scheduler.gamma=0.5"]
    cfg, datamodule, module = setup_run(tmp_path, data_root, extra)
    recorder = LRRecorder()
    make_trainer(cfg, [recorder], enable_checkpointing=False).fit(module, datamodule=datamodule)
    num_stages = len(stage_param_names(module.backbone))
    for epoch, lrs in enumerate(recorder.lrs):
        factor = expected_factor(scheduler, epoch, steps, epochs, cfg)
        for name, lr in lrs.items():
            scale = configured_scale("gradual", recorder.stage[name], num_stages, cfg)
            assert lr == pytest.approx(cfg.optimizer.lr * scale * factor, rel=1e-6), (epoch, name)


def test_unfreeze_epochs_below_zero_are_one_line_naming_the_key(data_root, tmp_path, capsys):
    from skuvision.tasks.train import train
    from skuvision.tasks.utils import run_cli as run_task

    overrides = [
        *quick_overrides("fashion_mnist", data_root),
        "finetune=gradual",
        "finetune.unfreeze_at=[-1,2]",
    ]
    with pytest.raises(SystemExit) as exited:
        run_task(train, compose_cfg("train", overrides, tmp_path / "run"))
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: finetune.unfreeze_at=[-1, 2]: give one or more epochs >= 0, e.g. [1,2,3]"]


def test_a_model_of_one_stage_is_refused_naming_the_fix():
    from skuvision.errors import SkuvisionError

    class OneStage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(2, 2)

        def group_matcher(self, coarse=False):
            return {"stem": r"^fc"}

    with pytest.raises(SkuvisionError, match="gives 1 stage\\(s\\).* use finetune=full"):
        stage_param_names(OneStage())
