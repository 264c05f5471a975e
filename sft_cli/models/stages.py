"""A model's stages: the named groups of submodules, bottom to top, that freeze policies, layer-wise lr decay and
the parameter table act on; and its classification head."""

from torch import nn

from sft_cli.errors import SFTError

Stage = tuple[str, list[str]]  # (stage name, names of the submodules or parameters it holds)


def head_name(model: nn.Module) -> str:
    """The classification head: the last nn.Linear in registration order (fc, classifier.3, heads.head, ...)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise SFTError(f"{type(model).__name__} has no nn.Linear layer to use as the classification head")
    return names[-1]


def stage_names(model: nn.Module, stem: list[str] = (), expand: list[str] = ()) -> list[Stage]:
    """The model's stages bottom to top: its top-level children (and direct parameters) in registration
    order, with each module named in `expand` replaced by its own children and the names in `stem`
    merged into one first stage called "stem"."""

    def pieces(prefix: str, module: nn.Module) -> list[str]:
        out = [f"{prefix}{n}" for n, _ in module.named_parameters(recurse=False)]
        for n, child in module.named_children():
            if f"{prefix}{n}" in expand:
                out += pieces(f"{prefix}{n}.", child)
            elif any(True for _ in child.parameters()):
                out.append(f"{prefix}{n}")
        return out

    names = pieces("", model)
    missing = [s for s in stem if s not in names]
    if missing:
        raise SFTError(f"model.stem names {missing}, which are not stages of {type(model).__name__}: {names}")
    stages = [("stem", list(stem))] if stem else []
    return stages + [(n, [n]) for n in names if n not in stem]
