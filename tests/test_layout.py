"""The package's walls: no import cycles, a core that knows no task, and checkpoints written before the task
folders (main 0ea1499) still evaluate and resume."""

import ast
import json
import logging
from pathlib import Path

import pytest
from hydra.utils import get_method

import sft_cli
from conftest import ok, read_json, run_cli
from fixtures import chat_rows, sentiment_rows, write_tiny_bert, write_tiny_llama
from inprocess import train_here
from sft_cli.training import checkpoint

PACKAGE = Path(sft_cli.__file__).parent
# What every task plugs into; none of it may import a task (tasks/) to know what it runs.
CORE = ("sft_cli.train", "sft_cli.task", "sft_cli.config", "sft_cli.checks", "sft_cli.errors", "sft_cli.training")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each sft_cli module -> the sft_cli modules it imports anywhere in its body (lazy imports included)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
                # `from sft_cli.training import checkpoint` imports the module sft_cli.training.checkpoint
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name and modules[m].name != "__init__.py"}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of graph, as the modules around it, or None."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[module] = "done"
        stack.pop()
        return None

    return next((found for module in sorted(graph) if module not in state and (found := visit(module))), None)


def test_the_package_has_no_import_cycle():
    graph = imports()
    assert "sft_cli.train" in graph and "sft_cli.tasks.classification.task" in graph  # the walk found the tree
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_the_folders_import_each_other_one_way():
    """Between folders too (tasks -> models -> config, never back): a module may move between files of a
    folder without making a cycle."""
    def folder(module: str) -> str:
        return ".".join(module.split(".")[:2]) if module.count(".") > 1 else module

    modules = imports()
    graph = {}
    for module, targets in modules.items():
        graph.setdefault(folder(module), set()).update(folder(t) for t in targets if folder(t) != folder(module))
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_cycle_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_reaches_no_task_module():
    graph = imports()
    core = [m for m in graph if any(m == c or m.startswith(c + ".") for c in CORE)]
    assert "sft_cli.training.optim" in core and "sft_cli.task" in core
    for start in core:
        seen, todo = set(), [start]
        while todo:
            module = todo.pop()
            assert not module.startswith("sft_cli.tasks"), f"{start} imports {module} (through {sorted(seen)})"
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])


def test_every_moved_target_names_what_its_old_path_named():
    old = Path(__file__).parent / "legacy" / "main-0ea1499"
    legacy_targets = {line.split("_target_:")[1].strip() for f in old.rglob("config.yaml")
                      for line in f.read_text().splitlines() if "_target_: sft_cli." in line}
    assert legacy_targets <= checkpoint.MOVED.keys()
    for new in checkpoint.MOVED.values():
        assert callable(get_method(new)), new


@pytest.fixture(scope="module")
def legacy_runs(tmp_path_factory) -> Path:
    """A text and a chat run trained by this version whose best checkpoints then get the config.yaml and
    meta.json that main 0ea1499 wrote for the same runs (tests/legacy): a checkpoint from before the move."""
    root = tmp_path_factory.mktemp("legacy")
    write_tiny_bert(root / "tiny-bert")
    (root / "train.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in sentiment_rows(64, seed=1)))
    write_tiny_llama(root / "tiny-llama")
    (root / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(40, seed=1)))
    for kind, overrides in legacy_overrides(root).items():
        train_here(overrides, root / kind)
        best = root / kind / "checkpoints" / "best"
        for name in ("config.yaml", "meta.json"):
            saved = (Path(__file__).parent / "legacy" / "main-0ea1499" / kind / name).read_text()
            (best / name).write_text(saved.replace("@ROOT@", str(root)))
    return root


def legacy_overrides(root: Path) -> dict[str, list[str]]:
    """The command lines that made tests/legacy's checkpoints on main 0ea1499."""
    return {"text": ["+experiment=text_classification", f"dataset.train_file={root}/train.tsv",
                     f"model.name_or_path={root}/tiny-bert", "trainer.max_epochs=1", "trainer.batch_size=16"],
            "chat": ["+experiment=chat_sft", f"dataset.train_file={root}/chats.jsonl",
                     f"model.name_or_path={root}/tiny-llama", "trainer.max_epochs=1", "trainer.batch_size=8",
                     "task.samples=0"]}


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_a_checkpoint_written_before_the_task_folders_evaluates(legacy_runs, kind):
    best = legacy_runs / kind / "checkpoints" / "best"
    assert "sft_cli.loss." in (best / "config.yaml").read_text()  # really the old paths
    ok(run_cli("sft-eval", f"checkpoint={best}", "split=val", f"hydra.run.dir=eval-{kind}", cwd=legacy_runs))
    report = read_json(legacy_runs / f"eval-{kind}" / "eval.json")
    assert report["samples"] > 0 and 0 < report["loss"] < 20 and report["checkpoint"] == str(best.resolve())


def test_a_checkpoint_written_before_the_task_folders_resumes(legacy_runs, caplog):
    best = legacy_runs / "text" / "checkpoints" / "best"
    with caplog.at_level(logging.WARNING):
        train_here(legacy_overrides(legacy_runs)["text"][:-2] + ["trainer.max_epochs=2", "trainer.batch_size=16",
                                                                  f"resume={best}"], legacy_runs / "resumed")
    assert not [r for r in caplog.records if "_target_" in r.getMessage()]  # the old paths read as the new ones
    assert read_json(legacy_runs / "resumed" / "summary.json")["epochs"] == 2


def test_a_builder_that_gives_no_parts_is_an_error_naming_it():
    from torch import nn

    from sft_cli.errors import SFTError
    from sft_cli.models import parts

    with pytest.raises(SFTError, match=r"model <my.builder> returned a Linear without `sft`.*model.sft = Parts"):
        parts.require(nn.Linear(2, 2), "my.builder")
