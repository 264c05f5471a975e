"""An optimizer for tests that records what the loop hands it: configs map to constructors, so a test swaps it in
with optimizer._target_=grad_probe.RecordGrads +optimizer.record_to=<folder> (tests/ on PYTHONPATH)."""

from pathlib import Path

import torch


class RecordGrads(torch.optim.SGD):
    """SGD that first saves the gradients of each step (a list in parameter order) to
    <record_to>/step-<n>-rank-<rank>.pt: the gradients the loop computed, after accumulation, DDP, division
    and clipping, exactly as the optimizer sees them."""

    def __init__(self, params, record_to: str, **sgd):
        super().__init__(params, **sgd)
        self.record_to, self.steps = Path(record_to), 0

    @torch.no_grad()
    def step(self, closure=None):
        self.steps += 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        grads = [p.grad.detach().clone().cpu() if p.grad is not None else None
                 for group in self.param_groups for p in group["params"]]
        self.record_to.mkdir(parents=True, exist_ok=True)
        torch.save(grads, self.record_to / f"step-{self.steps}-rank-{rank}.pt")
        return super().step(closure)


def recorded(folder: Path, step: int = 1, rank: int = 0) -> list[torch.Tensor | None]:
    return torch.load(Path(folder) / f"step-{step}-rank-{rank}.pt")


def max_relative_difference(a: list, b: list) -> float:
    """The largest ||a_i - b_i|| / ||b_i|| over parameters (both None for a parameter that had no gradient).
    A gradient that is zero but for rounding (below 1e-4 of the whole gradient's norm: an attention key bias,
    to which softmax is blind) is compared against that floor instead of its own norm."""
    assert len(a) == len(b) and [x is None for x in a] == [y is None for y in b]
    pairs = [(x, y) for x, y in zip(a, b) if y is not None]
    floor = 1e-4 * float(sum(y.double().pow(2).sum() for _, y in pairs) ** 0.5)
    return max(float((x - y).norm()) / max(float(y.norm()), floor) for x, y in pairs)
