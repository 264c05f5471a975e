"""lr schedules (built from configs/scheduler/*.yaml exactly as the recipe builds them) and parameter groups."""

import io
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from sft_cli import config
from sft_cli.models.parts import Parts
from sft_cli.training import optim

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SCHEDULERS = ["constant", "step", "cosine", "linear", "onecycle", "plateau"]


def sgd(lrs=(1.0,)):
    """SGD with lr=1.0 over a tiny nn.Linear (one param group per entry of `lrs`)."""
    torch.manual_seed(0)
    layers = [nn.Linear(2, 2) for _ in lrs]
    return torch.optim.SGD([{"params": layer.parameters(), "lr": lr} for layer, lr in zip(layers, lrs)], lr=lrs[0])


def scheduler(name, optimizer, total, steps_per_epoch, mode="max", monitor="val/accuracy", **overrides):
    """config.build(configs/scheduler/<name>.yaml, ...) as train.py calls it, inside a config with a trainer."""
    node = OmegaConf.merge(OmegaConf.load(CONFIGS / "scheduler" / f"{name}.yaml"), overrides)
    root = OmegaConf.create({"trainer": {"mode": mode, "monitor": monitor}, "scheduler": node})
    return config.build(root.scheduler, optimizer, num_training_steps=total, steps_per_epoch=steps_per_epoch)


def curve(sched, optimizer, steps, group=0):
    """lr after 0, 1, ..., `steps` scheduler steps (the lr used by optimizer step k+1 is curve[k])."""
    lrs = [optimizer.param_groups[group]["lr"]]
    for _ in range(steps):
        optimizer.step()
        sched.step()
        lrs.append(optimizer.param_groups[group]["lr"])
    return lrs


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_yaml_builds_with_the_recipe_signature(name):
    opt = sgd()
    sched = scheduler(name, opt, total=100, steps_per_epoch=10)
    assert sched.optimizer is opt
    assert isinstance(sched, ReduceLROnPlateau) == (name == "plateau")


def test_constant_is_flat_after_a_fractional_warmup():
    opt = sgd()
    lrs = curve(scheduler("constant", opt, 100, 10, warmup_epochs=0.5), opt, 100)
    assert lrs[:6] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[5:] == pytest.approx([1.0] * 96)
    opt = sgd()
    assert curve(scheduler("constant", opt, 100, 10), opt, 100) == pytest.approx([1.0] * 101)  # yaml: no warmup


def test_cosine_warms_up_for_one_epoch_then_decays_to_zero():
    opt = sgd()
    lrs = curve(scheduler("cosine", opt, 100, 10, warmup_epochs=1), opt, 100)
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.5)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5)  # halfway through the 90 decay steps
    assert lrs[100] == pytest.approx(0.0, abs=1e-12)
    assert lrs[10] == max(lrs)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone after warmup
    assert lrs[32] == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 90)))


def test_cosine_floors_at_min_lr_ratio():
    opt = sgd()
    lrs = curve(scheduler("cosine", opt, 50, 10, warmup_epochs=0, min_lr_ratio=0.1), opt, 50)
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[25] == pytest.approx(0.55)
    assert lrs[50] == pytest.approx(0.1)


def test_step_multiplies_by_gamma_exactly_at_epoch_boundaries():
    opt = sgd()
    lrs = curve(scheduler("step", opt, 60, 10, step_epochs=2, gamma=0.1), opt, 60)
    assert lrs[0] == lrs[19] == pytest.approx(1.0)
    assert lrs[20] == lrs[39] == pytest.approx(0.1)
    assert lrs[40] == lrs[59] == pytest.approx(0.01)
    assert lrs[60] == pytest.approx(0.001)


def test_step_with_warmup_counts_epochs_from_the_start_of_training():
    opt = sgd()
    lrs = curve(scheduler("step", opt, 60, 10, step_epochs=2, gamma=0.5, warmup_epochs=1), opt, 60)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5)
    assert lrs[10] == lrs[19] == pytest.approx(1.0)
    assert lrs[20] == lrs[39] == pytest.approx(0.5)
    assert lrs[40] == pytest.approx(0.25)


def test_linear_warms_up_then_decays_linearly_to_zero():
    opt = sgd()
    lrs = curve(scheduler("linear", opt, 100, 10), opt, 100)  # yaml: warmup_epochs 0.5 = 5 steps
    assert lrs[:6] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[24] == pytest.approx(1 - 19 / 95)
    assert lrs[100] == pytest.approx(0.0, abs=1e-12)
    diffs = [b - a for a, b in zip(lrs[5:], lrs[6:])]
    assert diffs == pytest.approx([-1 / 95] * 95)


def test_onecycle_starts_low_peaks_at_pct_start_and_ends_near_zero():
    opt = sgd()
    lrs = curve(scheduler("onecycle", opt, 100, 10), opt, 99)  # yaml: pct_start .3, div 25, final_div 1e4
    assert lrs[0] == pytest.approx(1.0 / 25)
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert peak == 29  # 0.3 x 100 steps, counted from 0
    assert lrs[29] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:29], lrs[1:30]))
    assert all(a > b for a, b in zip(lrs[29:], lrs[30:]))
    assert lrs[99] == pytest.approx(1.0 / 25 / 1e4)


def test_onecycle_peaks_at_each_groups_own_lr():
    opt = sgd(lrs=(1.0, 10.0))  # backbone lr and head_lr
    sched = scheduler("onecycle", opt, 100, 10)
    curve(sched, opt, 29)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.0, 10.0])


def test_plateau_divides_lr_by_ten_after_patience_non_improving_validations():
    opt = sgd()
    sched = scheduler("plateau", opt, 100, 10, mode="max", patience=1)
    assert sched.mode == "max" and sched.factor == 0.1
    lrs = []
    for metric in [0.5, 0.6, 0.6, 0.55, 0.7, 0.7, 0.69, 0.69]:
        sched.step(metric)
        lrs.append(opt.param_groups[0]["lr"])
    # 0.6 twice more (bad 1, bad 2 > patience 1): drop; 0.7 improves; 0.7, 0.69 bad: drop; then 1 bad again
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.01, 0.01])


def test_plateau_mode_follows_trainer_mode():
    opt = sgd()
    sched = scheduler("plateau", opt, 100, 10, mode="min", patience=0)
    sched.step(1.0)
    sched.step(0.5)  # lower loss is an improvement in min mode
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    sched.step(0.6)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_plateau_mode_follows_the_monitored_metric_when_trainer_mode_is_null():
    opt = sgd()
    sched = scheduler("plateau", opt, 100, 10, mode=None, monitor="val/loss", patience=0)
    sched.step(1.0)
    sched.step(0.5)  # val/loss is minimised: lower is an improvement
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)


def _round_trip(blob):
    """torch.save + torch.load(weights_only=True), as checkpoint.save/load_state do."""
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name,overrides", [
    ("constant", {"warmup_epochs": 1}),
    ("step", {"step_epochs": 1, "gamma": 0.5, "warmup_epochs": 0.5}),
    ("cosine", {"warmup_epochs": 1}),
    ("linear", {}),
    ("onecycle", {}),
    ("plateau", {"patience": 1}),
])
def test_scheduler_state_saved_mid_run_resumes_with_identical_lrs(name, overrides):
    metrics = [0.1, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3, 0.3, 0.25, 0.4, 0.4, 0.4]

    def run(opt, sched, steps, start):
        lrs = []
        for i in range(start, start + steps):
            opt.step()
            sched.step(metrics[i % len(metrics)]) if name == "plateau" else sched.step()
            lrs.append([g["lr"] for g in opt.param_groups])
        return lrs

    opt = sgd(lrs=(1.0, 3.0))
    sched = scheduler(name, opt, 40, 8, **overrides)
    run(opt, sched, 17, 0)
    saved = _round_trip({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    expected = run(opt, sched, 23, 17)

    fresh_opt = sgd(lrs=(1.0, 3.0))
    fresh = scheduler(name, fresh_opt, 40, 8, **overrides)
    fresh_opt.load_state_dict(saved["optimizer"])
    fresh.load_state_dict(saved["scheduler"])
    assert run(fresh_opt, fresh, 23, 17) == expected
    assert len({tuple(lr) for lr in expected}) > 1 or name in ("constant", "plateau")


def tiny_convnet():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 8, bias=True), nn.LayerNorm(8), nn.Linear(8, 3))
    model.sft = Parts([("body", ["0", "1", "4", "5"]), ("head", ["6"])], new_stages=["head"])
    return model


def test_param_groups_exempt_biases_and_norm_weights_from_decay_and_give_the_head_head_lr():
    model = tiny_convnet()
    groups = optim.param_groups(model, "6", lr=0.01, weight_decay=5e-4, head_lr=0.1)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone/no_decay", "head", "head/no_decay"}
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert ids(by_name["backbone"]) == {id(model[0].weight), id(model[4].weight)}
    assert ids(by_name["backbone/no_decay"]) == {id(p) for p in (model[0].bias, model[1].weight, model[1].bias,
                                                                  model[4].bias, model[5].weight, model[5].bias)}
    assert ids(by_name["head"]) == {id(model[6].weight)}
    assert ids(by_name["head/no_decay"]) == {id(model[6].bias)}
    assert (by_name["backbone"]["lr"], by_name["backbone"]["weight_decay"]) == (0.01, 5e-4)
    assert (by_name["backbone/no_decay"]["lr"], by_name["backbone/no_decay"]["weight_decay"]) == (0.01, 0.0)
    assert (by_name["head"]["lr"], by_name["head"]["weight_decay"]) == (0.1, 5e-4)
    assert (by_name["head/no_decay"]["lr"], by_name["head/no_decay"]["weight_decay"]) == (0.1, 0.0)


def test_param_groups_hold_every_parameter_exactly_once_including_frozen_ones():
    from sft_cli.models import vision

    model = vision.torchvision_classifier("resnet18", classes=list("abcde"), weights=None, stem=["conv1", "bn1"])
    model.layer1.requires_grad_(False)
    groups = optim.param_groups(model, "fc", lr=0.01, weight_decay=1e-4, head_lr=None)
    listed = [id(p) for g in groups for p in g["params"]]
    assert len(listed) == len(set(listed))
    assert set(listed) == {id(p) for p in model.parameters()}
    assert all(g["lr"] == 0.01 for g in groups)  # head_lr null: the head gets lr
    decay = {n for n, p in model.named_parameters()
             if any(p is q for g in groups if g["weight_decay"] == 1e-4 for q in g["params"])}
    assert decay == {n for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1}
    assert "fc.weight" in decay and "bn1.weight" not in decay and "fc.bias" not in decay


def test_build_optimizer_from_the_sgd_yaml_gives_the_head_param_groups_head_lr():
    cfg = OmegaConf.load(CONFIGS / "optimizer" / "sgd.yaml")
    groups = OmegaConf.create({"head_lr": 0.1, "layer_decay": None})  # train.yaml's param_groups node
    model = tiny_convnet()
    opt = optim.build_optimizer(cfg, groups, model, "6")
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9 and "head_lr" not in opt.defaults
    lrs = {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert lrs == {"backbone": (0.01, 5e-4), "backbone/no_decay": (0.01, 0.0),
                   "head": (0.1, 5e-4), "head/no_decay": (0.1, 0.0)}
