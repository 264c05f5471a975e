"""Freeze policies: which stages of a model train. Each policy is a `_target_` in configs/freeze/."""

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sft_cli.errors import SFTError, not_one_of
from sft_cli.models.stages import Stage


def _members(model: nn.Module, stage: Stage) -> list[nn.Module | nn.Parameter]:
    out = []
    for name in stage[1]:
        try:
            out.append(model.get_submodule(name))
        except AttributeError:  # a direct parameter such as ViT's class_token
            out.append(model.get_parameter(name))
    return out


def _parameters(model: nn.Module, stage: Stage):
    for member in _members(model, stage):
        yield from member.parameters() if isinstance(member, nn.Module) else [member]


def _head_index(stages: list[Stage], head: str) -> int:
    return next(i for i, (_, members) in enumerate(stages)
                if any(head == m or head.startswith(m + ".") for m in members))


class NoFreeze:
    """Every stage trains."""

    def frozen(self, stages: list[Stage], head: str, epoch: int) -> list[str]:
        return []


class HeadOnly:
    """Only the stage holding the classification head trains (a linear probe)."""

    def frozen(self, stages: list[Stage], head: str, epoch: int) -> list[str]:
        h = _head_index(stages, head)
        return [name for i, (name, _) in enumerate(stages) if i != h]


class Lower:
    """The stem and the lowest `n` stages above it are frozen, or every stage up to and including `until`."""

    def __init__(self, n: int = 2, until: str | None = None):
        if not isinstance(n, int) or isinstance(n, bool):
            raise SFTError(f"freeze.n={n!r} must be a whole number of blocks (e.g. freeze.n=2)")
        self.n, self.until = n, until

    def frozen(self, stages: list[Stage], head: str, epoch: int) -> list[str]:
        names = [name for name, _ in stages]
        backbone = names[:_head_index(stages, head)]
        if self.until is not None:
            if self.until not in backbone:
                raise SFTError(not_one_of("freeze.until", self.until, backbone))
            return backbone[: backbone.index(self.until) + 1]
        count = self.n + (1 if names[0] == "stem" else 0)
        if not 0 <= self.n < len(backbone):
            raise SFTError(f"freeze.n={self.n} must be between 0 and {len(backbone) - 1} for this model, whose "
                           f"stages below the head are: {', '.join(backbone)}")
        return backbone[:count]


class Gradual:
    """Head-only at first, then one more stage unfrozen from the top every `every_n_epochs` epochs."""

    def __init__(self, every_n_epochs: int = 1):
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise SFTError(f"freeze.every_n_epochs={every_n_epochs} must be at least 1")
        self.every_n_epochs = every_n_epochs

    def frozen(self, stages: list[Stage], head: str, epoch: int) -> list[str]:
        h = _head_index(stages, head)
        below = [name for name, _ in stages[:h]]
        return below[: max(0, len(below) - epoch // self.every_n_epochs)]


def apply(model: nn.Module, stages: list[Stage], frozen: list[str]) -> None:
    """Set requires_grad by stage and put the model in train mode, with frozen BatchNorm layers in eval mode so
    they keep their (pretrained) running statistics. Call it at the start of every epoch. With an adapter
    (model.sft.trainable) only the parameters it names train, in the stages not frozen, and every BatchNorm
    layer but those trained in full keeps its statistics (an adapter checkpoint does not hold them)."""
    model.train()
    allowed = model.sft.trainable
    trainable = None if allowed is None else {id(p) for n, p in model.named_parameters() if n in allowed}
    for stage in stages:
        is_frozen = stage[0] in frozen
        for p in _parameters(model, stage):
            p.requires_grad_(not is_frozen and (trainable is None or id(p) in trainable))
        for member in _members(model, stage) if is_frozen else ():
            for m in member.modules() if isinstance(member, nn.Module) else ():
                if isinstance(m, _BatchNorm):
                    m.eval()
    if trainable is not None:
        in_full = tuple(m + "." for m in model.sft.adapter.in_full)
        for name, m in model.named_modules():
            if isinstance(m, _BatchNorm) and ".modules_to_save." not in name and not (name + ".").startswith(in_full):
                m.eval()


def parameter_counts(model: nn.Module, stages: list[Stage]) -> list[tuple[str, int, int]]:
    """(stage, trainable, total) parameter counts, for the table printed at start. A parameter shared by two
    stages (a language model's lm_head tied to its input embeddings) counts once, in the first."""
    rows, seen = [], set()
    for stage in stages:
        params = [p for p in _parameters(model, stage) if id(p) not in seen]
        seen.update(id(p) for p in params)
        rows.append((stage[0], sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)))
    return rows
