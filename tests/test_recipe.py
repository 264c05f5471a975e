"""train_one_epoch's arithmetic on a tiny model: gradient accumulation and the fp16 grad scaler."""

import torch
from omegaconf import OmegaConf
from torch import nn

from sft_cli.tasks.classification import loss
from sft_cli.tasks.classification.task import Classification
from sft_cli.train import Learner, Run, TrainState, train_one_epoch
from sft_cli.training import distributed, optim


class Records:
    def __init__(self):
        self.rows = []

    def record(self, row):
        self.rows.append(row)


def run_epoch(model, batches, accumulate, precision="32", clip=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = optim.constant(optimizer, num_training_steps=100, steps_per_epoch=10)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "16-mixed")
    trainer = {"accumulate_grad_batches": accumulate, "gradient_clip_norm": clip, "log_every_n_steps": 1,
               "max_epochs": 1, "precision": precision, "progress_bar": False, "max_steps": None,
               "checkpoint_every_n_steps": None}
    task = Classification()
    task.classes = ["a", "b", "c"]
    task.criterion = loss.CrossEntropy(label_smoothing=0.0, class_weights=None, extra=None, train_targets=[0, 1, 2],
                                       num_classes=3, model=model)
    run = Run(OmegaConf.create({"trainer": trainer}), None, task, torch.device("cpu"), distributed.Context())
    run.files, state = Records(), TrainState()
    stats = train_one_epoch(run, Learner(model, model, optimizer, scheduler, scaler, []), batches, state)
    return state, run.files, stats, scaler


def test_a_short_last_accumulation_group_is_averaged_over_its_own_batches():
    """3 batches, accumulate 2: the steps use mean(grad b0, grad b1), then grad b2 alone (not grad b2 / 2)."""
    torch.manual_seed(0)
    batches = [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(3)]
    model = nn.Linear(5, 3)
    expected = nn.Linear(5, 3)
    expected.load_state_dict(model.state_dict())

    def grad(m, x, y):
        m.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        return [p.grad.clone() for p in m.parameters()]

    g0, g1 = grad(expected, *batches[0]), grad(expected, *batches[1])
    with torch.no_grad():
        for p, a, b in zip(expected.parameters(), g0, g1):
            p -= (a + b) / 2
    g2 = grad(expected, *batches[2])
    with torch.no_grad():
        for p, c in zip(expected.parameters(), g2):
            p -= c

    state, records, stats, _ = run_epoch(model, batches, accumulate=2)
    assert state.step == 2 and [r["step"] for r in records.rows] == [1, 2]
    for p, q in zip(model.parameters(), expected.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_fp16_autocast_with_a_grad_scaler_and_clipping_trains_and_keeps_its_scale():
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    before = [p.clone() for p in model.parameters()]
    state, records, stats, scaler = run_epoch(model, batches * 5, accumulate=1, precision="16-mixed", clip=1.0)
    assert state.step == 20 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records.rows)
    assert records.rows[-1]["loss"] < records.rows[0]["loss"]
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.state_dict()["scale"] > 0  # what a checkpoint saves for resume
