"""Chat data from a Hugging Face dataset (dataset.hub: here a folder saved with save_to_disk, no network) and from
several train files mixed by ratios (dataset.train_files, dataset.mix): the same examples, masks and errors as
files; the mix's counts, its seed, its checks, and what a run reports about it."""

import json
import sys
from pathlib import Path

import datasets
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import assert_kill_and_resume_is_bitwise, read_json, run_cli
from fixtures import chat_rows, write_tiny_llama
from inprocess import train_offline

from sft_cli import checks, config
from sft_cli.errors import SFTError
from sft_cli.extras import install_command
from sft_cli.results.report import config_choices
from sft_cli.tasks.causal_lm.chats import IGNORE, chat_files
from sft_cli.tasks.causal_lm.sources import draw

LAYOUTS = {  # (records, dataset.fields): every layout a file may hold, and a column mapping
    "messages": ([{"messages": [{"role": "user", "content": f"colour of sky {i}"},
                                {"role": "assistant", "content": "blue"}]} for i in range(12)], None),
    "sharegpt": ([{"conversations": [{"from": "system", "value": "answer with one colour"},
                                     {"from": "human", "value": f"colour of snow {i}"},
                                     {"from": "gpt", "value": "white"}]} for i in range(12)], None),
    "prompt_completion": ([{"question": f"colour of coal {i}", "answer": " black"} for i in range(12)],
                          {"prompt": "question", "completion": "answer"}),
    "alpaca": ([{"instruction": f"colour of sun {i}", "output": "yellow", **({"input": "one word"} if i % 2 else {})}
                for i in range(12)], None),
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return str(write_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama"))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Each test tokenizes into its own cache, never into ~/.cache."""
    monkeypatch.setenv("SFT_CLI_CACHE", str(tmp_path / "cache"))


def jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def table(rows: list[dict]) -> datasets.Dataset:
    """The records as a hub dataset holds them: one column per field of any record, None where a record lacks it
    (Dataset.from_list would keep the first record's fields only)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return datasets.Dataset.from_dict({column: [row.get(column) for row in rows] for column in columns})


def save(folder: Path, **splits: list) -> str:
    """A DatasetDict of the records, as datasets.save_to_disk writes it (what `datasets` caches from the hub)."""
    datasets.DatasetDict({name: table(rows) for name, rows in splits.items()}).save_to_disk(str(folder))
    return str(folder)


def examples(dataset) -> list[tuple[tuple, tuple]]:
    return [(tuple(dataset[i]["input_ids"]), tuple(dataset[i]["labels"])) for i in range(len(dataset))]


# ---- a hub dataset is read as a file is ------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_saved_hub_dataset_gives_the_examples_and_masks_of_the_same_records_in_a_jsonl_file(tmp_path, llama,
                                                                                               layout):
    records, fields = LAYOUTS[layout]
    folder = save(tmp_path / "saved", train=records[:9], test=records[9:])
    files = chat_files(jsonl(tmp_path / "train.jsonl", records[:9]), llama, fields=fields,
                       val_file=jsonl(tmp_path / "test.jsonl", records[9:]))
    hub = chat_files(None, llama, fields=fields, hub=folder, hub_val_split="test", hub_test_split="test")
    assert len(hub.train) == 9 and examples(hub.train) == examples(files.train)
    assert examples(hub.val) == examples(files.val) and hub.test is hub.val  # one split: evaluated once
    assert any(label != IGNORE for _, labels in examples(hub.train) for label in labels)  # responses are learned
    assert hub.prompt_format == files.prompt_format
    assert hub.references["val"] == files.references["val"] and hub.sample_prompts == files.sample_prompts
    carved, carved_files = (chat_files(None, llama, fields=fields, hub=folder, val_size=3),
                            chat_files(jsonl(tmp_path / "train.jsonl", records[:9]), llama, fields=fields, val_size=3))
    assert examples(carved.val) == examples(carved_files.val) and len(carved.val) == 3  # the same slice held out


def test_a_column_a_record_lacks_is_absent_as_in_its_file_not_an_empty_value(tmp_path, llama):
    # the hub table has a `messages` column because of the last record; the others hold None there
    records = [{"prompt": f"colour of rust {i}", "completion": " orange"} for i in range(8)] + chat_rows(1)
    folder = save(tmp_path / "saved", train=records)
    files = chat_files(jsonl(tmp_path / "train.jsonl", records), llama, skip_bad_rows=True, val_size=2)
    hub = chat_files(None, llama, hub=folder, skip_bad_rows=True, val_size=2)
    assert hub.prompt_format["format"] == files.prompt_format["format"] == "prompt_completion"
    assert examples(hub.train) == examples(files.train) and len(hub.train) == 6
    assert hub.skipped == {"dataset.hub": 1} and files.skipped == {"dataset.train_file": 1}  # the chat: no prompt


def test_a_bad_hub_record_is_the_same_error_as_in_a_file_named_by_its_split_and_row(tmp_path, llama):
    records = chat_rows(6) + [{"messages": [{"role": "robot", "content": "beep"}]}] + chat_rows(3, seed=1)
    folder = save(tmp_path / "saved", train=records)
    with pytest.raises(SFTError) as from_file:
        chat_files(jsonl(tmp_path / "train.jsonl", records), llama)
    with pytest.raises(SFTError) as from_hub:
        chat_files(None, llama, hub=folder)
    assert str(from_file.value).startswith(f"{tmp_path / 'train.jsonl'}:7: the record has a message 0 whose")
    assert str(from_hub.value) == f"{folder}[train][6]:" + str(from_file.value).split(":7:", 1)[1]
    assert "dataset.skip_bad_rows=true" in str(from_hub.value)
    skipped = chat_files(None, llama, hub=folder, skip_bad_rows=True, val_size=2)
    assert skipped.skipped == {"dataset.hub": 1} and len(skipped.train) + len(skipped.val) == 9


def test_an_unknown_split_names_the_key_and_the_splits_there_are(tmp_path, llama):
    folder = save(tmp_path / "saved", train=chat_rows(8), test=chat_rows(4))
    with pytest.raises(SFTError, match=r"dataset.hub_val_split='validation' is not one of: train, test \(the splits "
                                       r"of dataset.hub=.*saved\)\. Name one of its splits, or set "):
        chat_files(None, llama, hub=folder, hub_val_split="validation")
    with pytest.raises(SFTError, match=r"dataset.hub_split='training' is not one of: train, test"):
        chat_files(None, llama, hub=folder, hub_split="training")
    alone = tmp_path / "alone"  # a Dataset saved by itself is the split `train`
    table(chat_rows(8)).save_to_disk(str(alone))
    assert len(chat_files(None, llama, hub=str(alone), val_size=2).val) == 2


def test_without_datasets_installed_the_error_names_the_install_command(tmp_path, llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(SFTError) as error:
        chat_files(None, llama, hub="HuggingFaceH4/no_robots")
    assert str(error.value).startswith("dataset.hub=HuggingFaceH4/no_robots needs the optional `datasets` library: ")
    assert install_command("hub") in str(error.value) and "dataset.train_file=" in str(error.value)


def test_a_hub_name_that_cannot_be_loaded_says_which_key_and_how_to_fix_it(tmp_path, llama, monkeypatch):
    def offline(name, config=None):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SFTError) as error:
        chat_files(None, llama, hub="HuggingFaceH4/no_robots", hub_config="default")
    message = str(error.value)
    assert message.startswith("dataset.hub=HuggingFaceH4/no_robots (dataset.hub_config=default) could not be loaded "
                              "(ConnectionError: Couldn't reach")
    assert "network access" in message and "save_to_disk" in message
    with pytest.raises(SFTError, match=r"dataset.hub=\./nowhere: no such folder"):  # a path, not a hub name
        chat_files(None, llama, hub="./nowhere")


def test_training_data_must_come_from_exactly_one_source(tmp_path, llama):
    with pytest.raises(SFTError, match=r"no training data: set dataset.train_file=\.\.\. .*dataset.train_files="
                                       r"\[a.jsonl,b.jsonl\] .*dataset.hub=\.\.\."):
        chat_files(None, llama)
    folder = save(tmp_path / "saved", train=chat_rows(8))
    with pytest.raises(SFTError, match="dataset.train_file and dataset.hub are set together: give one source"):
        chat_files(jsonl(tmp_path / "a.jsonl", chat_rows(8)), llama, hub=folder)
    with pytest.raises(SFTError, match=r"dataset.val_file=.* and dataset.hub_val_split=train are both set"):
        chat_files(None, llama, hub=folder, hub_val_split="train", val_file=str(tmp_path / "a.jsonl"))


def test_a_hub_only_run_trains_and_its_checkpoint_names_the_folder_from_anywhere(tmp_path, llama):
    save(tmp_path / "saved", train=chat_rows(60, seed=1), test=chat_rows(12, seed=2))
    train_offline(["+experiment=chat_sft", "dataset.hub=saved", "dataset.hub_val_split=test",
                   f"model.name_or_path={llama}", "trainer.max_epochs=1", "trainer.batch_size=16",
                   "trainer.progress_bar=false", "report=false", "task.generate_samples=0"], "run", cwd=tmp_path)
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["status"] == "completed" and summary["steps"] == 4 and summary["train_mix"] == {}
    saved = (tmp_path / "run" / "checkpoints" / "best" / "config.yaml").read_text()
    assert f"hub: {tmp_path / 'saved'}\n" in saved  # made absolute: sft-eval finds it from any folder


def test_a_config_naming_no_training_data_is_refused_before_anything_loads(llama):
    with initialize_config_dir(config.find_config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=chat_sft", f"model.name_or_path={llama}"])
    with pytest.raises(SFTError, match=r"no training data: set dataset.train_file=\.\.\. .*or dataset.hub=\.\.\."):
        checks.check(cfg)
    cfg.dataset.hub = "HuggingFaceH4/no_robots"
    checks.check(cfg)  # a hub-only config is complete


def test_an_unknown_split_stops_sft_train_with_the_key_and_no_traceback(tmp_path, llama):
    save(tmp_path / "saved", train=chat_rows(8))
    result = run_cli("sft-train", "+experiment=chat_sft", f"model.name_or_path={llama}", "dataset.hub=saved",
                     "dataset.hub_split=validation", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.output
    assert "dataset.hub_split='validation' is not one of: train" in result.output


# ---- several train files, mixed ----------------------------------------------------------------------------


def tagged(tag: str, n: int) -> list[dict]:
    """n distinct chats, each telling its file by its words."""
    return [{"messages": [{"role": "user", "content": f"colour of {tag} {i}"},
                          {"role": "assistant", "content": "red" if tag == "apple" else "blue"}]} for i in range(n)]


@pytest.fixture
def two_files(tmp_path, llama) -> tuple[list[str], dict[str, set]]:
    """Files a (60 chats) and b (20), and which file each tokenized example comes from."""
    files = [jsonl(tmp_path / "a.jsonl", tagged("apple", 60)), jsonl(tmp_path / "b.jsonl", tagged("sky", 20))]
    val = jsonl(tmp_path / "val.jsonl", tagged("rose", 4))
    alone = {file: {ids for ids, _ in examples(chat_files(file, llama, val_file=val).train)} for file in files}
    assert not alone[files[0]] & alone[files[1]] and len(alone[files[0]]) == 60
    return files, alone


def from_each(splits, files: list[str], alone: dict[str, set]) -> list[int]:
    return [sum(ids in alone[file] for ids, _ in examples(splits.train)) for file in files]


def test_a_mix_draws_each_file_by_its_ratio_from_the_files_total(tmp_path, llama, two_files):
    files, alone = two_files
    val = str(tmp_path / "val.jsonl")
    splits = chat_files(None, llama, train_files=files, mix=[0.7, 0.3], val_file=val, mix_seed=0)
    assert len(splits.train) == 80 and from_each(splits, files, alone) == [56, 24]  # 0.7 and 0.3 of 60 + 20
    drawn = [ids for ids, _ in examples(splits.train)]
    assert len({ids for ids in drawn if ids in alone[files[0]]}) == 56  # fewer than a holds: no repeats
    repeats = [drawn.count(ids) for ids in alone[files[1]]]
    assert sorted(set(repeats)) == [1, 2] and sum(repeats) == 24  # more than b holds: each once, then 4 again
    assert splits.mix == {
        "dataset.train_files[0]": {"file": files[0], "examples": 60, "drawn": 56, "share": 0.7},
        "dataset.train_files[1]": {"file": files[1], "examples": 20, "drawn": 24, "share": 0.3}}
    assert examples(chat_files(None, llama, train_files=files, mix=[7, 3], val_file=val, mix_seed=0).train) == \
        examples(splits.train)  # ratios are normalised: 7:3 is 0.7:0.3
    every = chat_files(None, llama, train_files=files, val_file=val)  # no mix: every example once
    assert from_each(every, files, alone) == [60, 20] and len(set(examples(every.train))) == 80


def test_the_mix_seed_fixes_which_examples_and_their_order(tmp_path, llama, two_files):
    files, _ = two_files
    def build(seed: int) -> list:
        return examples(chat_files(None, llama, train_files=files, mix=[0.5, 0.5], mix_seed=seed,
                                   val_file=str(tmp_path / "val.jsonl")).train)

    first, again, other = build(1), build(1), build(2)
    assert first == again
    assert other != first and sorted(other) != sorted(first)  # another seed: other examples, in another order


def test_validation_is_carved_from_each_file_before_the_mix_draws(tmp_path, llama, two_files):
    files, alone = two_files
    splits = chat_files(None, llama, train_files=files, mix=[1, 1], val_size=0.25)
    val = {ids for ids, _ in examples(splits.val)}
    assert [len(val & alone[file]) for file in files] == [15, 5]  # a quarter of each file
    assert not val & {ids for ids, _ in examples(splits.train)}  # no held-out chat is trained on
    assert [fact["examples"] for fact in splits.mix.values()] == [45, 15] and len(splits.train) == 60
    assert from_each(splits, files, alone) == [30, 30]


def test_mix_mistakes_are_listed_at_once_naming_each_key(tmp_path, llama, two_files):
    files, _ = two_files
    with pytest.raises(SFTError) as error:
        chat_files(None, llama, train_files=[*files, str(tmp_path / "c.jsonl")], mix=[0.5, 0, "x", 0.2])
    message = str(error.value)
    assert f"dataset.train_files[2]={tmp_path / 'c.jsonl'}: no such file" in message
    assert "dataset.mix has 4 ratio(s) for 3 file(s) in dataset.train_files" in message
    assert "dataset.mix[1]=0 must be a positive number" in message and "dataset.mix[2]='x' must be" in message
    with pytest.raises(SFTError, match=r"dataset.mix has 1 ratio\(s\) for 2 file\(s\)"):
        chat_files(None, llama, train_files=files, mix=[1.0])
    with pytest.raises(SFTError, match=r"dataset.mix=\[0.5, 0.5\] weighs dataset.train_files, which is not set"):
        chat_files(files[0], llama, mix=[0.5, 0.5])
    with pytest.raises(SFTError, match=r"dataset.train_files='a.jsonl' must be a non-empty list of files"):
        chat_files(None, llama, train_files="a.jsonl")


def test_draw_rounds_by_largest_remainder_and_repeats_a_small_file_evenly():
    indices, counts = draw([1000, 10, 3], [0.5, 0.3, 0.2], seed=0)
    assert counts == [506, 304, 203] and len(indices) == 1013  # 506.5, 303.9, 202.6: the two largest remainders up
    assert [sum(start <= i < end for i in indices) for start, end in ((0, 1000), (1000, 1010), (1010, 1013))] == counts
    assert len(set(i for i in indices if i < 1000)) == 506  # sub-sampled: no example twice
    assert sorted({indices.count(i) for i in range(1010, 1013)}) == [67, 68]  # 203 of 3: each 67 or 68 times
    assert sorted({indices.count(i) for i in range(1000, 1010)}) == [30, 31]


def test_a_mixed_run_reports_each_file_in_its_summary_and_log(tmp_path, llama, caplog):
    jsonl(tmp_path / "a.jsonl", chat_rows(60, seed=1))
    jsonl(tmp_path / "b.jsonl", chat_rows(20, seed=2))
    with caplog.at_level("INFO", logger="sft_cli.tasks.causal_lm.sources"):
        train_offline(["+experiment=chat_sft", "dataset.train_files=[a.jsonl,b.jsonl]", "dataset.mix=[0.7,0.3]",
                       f"model.name_or_path={llama}", "trainer.max_epochs=1", "trainer.batch_size=16",
                       "trainer.progress_bar=false", "report=false", "task.generate_samples=0"], "run", cwd=tmp_path)
    mix = read_json(tmp_path / "run" / "summary.json")["train_mix"]
    assert {key: (fact["file"], fact["examples"], fact["drawn"]) for key, fact in mix.items()} == {
        "dataset.train_files[0]": (str(tmp_path / "a.jsonl"), 57, 53),  # 5 % of each file validates
        "dataset.train_files[1]": (str(tmp_path / "b.jsonl"), 19, 23)}
    assert f"training examples from 2 files (dataset.mix, drawn once with dataset.mix_seed=0): {tmp_path / 'a.jsonl'}: " \
        "53 of its 57 (69.7%)" in caplog.text
    saved = OmegaConf.to_container(OmegaConf.load(tmp_path / "run" / "checkpoints" / "last" / "config.yaml"))
    choices = dict(config_choices(saved))  # what the run's report lists
    assert choices["dataset"] == f"chat_files train_files=['{tmp_path / 'a.jsonl'}', '{tmp_path / 'b.jsonl'}'] " \
        "mix=[0.7, 0.3]"


@pytest.mark.slow
def test_a_mixed_run_killed_within_an_epoch_resumes_bitwise(tmp_path, llama):
    jsonl(tmp_path / "a.jsonl", chat_rows(150, seed=1))
    jsonl(tmp_path / "b.jsonl", chat_rows(50, seed=2))
    assert_kill_and_resume_is_bitwise(["+experiment=chat_sft", "dataset.train_files=[a.jsonl,b.jsonl]",
                                       "dataset.mix=[0.3,0.7]", f"model.name_or_path={llama}", "optimizer.lr=3e-3",
                                       "trainer.batch_size=16", "trainer.progress_bar=false", "report=false",
                                       "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=2"], tmp_path)
