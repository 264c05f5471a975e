"""Where chat data come from besides one file: a Hugging Face dataset (dataset.hub: a hub name, loaded by the
optional `datasets` library, or a local folder saved with save_to_disk), and several train files mixed by
ratios (dataset.train_files, dataset.mix). This module finds the sources, checks the keys that name them and
draws the mix; the records go through chats.py's reading, masks, token cache and errors as a file's do.

The mix is drawn once, when the data are built: a fixed list of examples, the same every epoch, so the
loop's shuffling, length grouping, packing and mid-epoch resume see an ordinary dataset.
"""

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import to_absolute_path

from sft_cli.errors import SFTError, not_one_of
from sft_cli.extras import install_command

log = logging.getLogger(__name__)

NO_TRAIN = ("no training data: set dataset.train_file=... (a .jsonl or .json file), dataset.train_files=[a.jsonl,"
            "b.jsonl] (several, mixed by dataset.mix) or dataset.hub=... (a Hugging Face dataset name, or a "
            "folder saved with save_to_disk)")
HUB_SPLITS = ("hub_split", "hub_val_split", "hub_test_split")


@dataclass(frozen=True)
class HubSplit:
    """One split of a hub dataset, read where chats.py reads a file: str() names it in messages, records()
    gives (location, record) as a file's reader does, resolve() lets val and test be found to be the same."""

    hub: str  # dataset.hub as given (a name, or a folder's absolute path under sft-train)
    split: str
    data: object = field(compare=False, repr=False)  # the datasets.Dataset

    def __str__(self) -> str:
        return f"{self.hub}[{self.split}]"

    def resolve(self) -> "HubSplit":
        return self

    def records(self):
        """(location, record) per row; a column that is None in a row (`datasets` fills in the columns a record
        lacks) is left out, so the record reads as the JSON object it was made from."""
        for i, record in enumerate(self.data):
            yield f"{self}[{i}]", {key: value for key, value in record.items() if value is not None}


@dataclass
class Sources:
    """The config keys that name each split's sources and what each names (a file path or a HubSplit): train
    has one or more (dataset.train_files), val and test none or one. No val source: val_size is carved."""

    train: dict[str, object]
    val: dict[str, object]
    test: dict[str, object]
    mix: list[float] | None = None  # normalised to sum 1, one per train source


def find(train_file: str | None, train_files: list | None, mix: list | None, hub: str | None,
         hub_config: str | None, hub_split: str | None, hub_val_split: str | None, hub_test_split: str | None,
         val_file: str | None, test_file: str | None) -> Sources:
    """Every split's sources, after checking the keys that name them (every problem at once, before a file is
    read); a hub dataset is loaded here, and only its named splits are kept."""
    problems = _train_problems(train_file, train_files, mix, hub)
    splits = {"hub_split": hub_split, "hub_val_split": hub_val_split, "hub_test_split": hub_test_split}
    if hub is None:
        problems += [f"dataset.{key}={value} names a split of dataset.hub, which is not set: set dataset.hub=... "
                     f"or dataset.{key}=null" for key, value in splits.items()
                     if value is not None and key != "hub_split"]
        if hub_config is not None:
            problems.append(f"dataset.hub_config={hub_config} names a configuration of dataset.hub, which is not set")
    elif not hub_split:
        problems.append("dataset.hub_split is empty: name the hub dataset's training split, e.g. "
                        "dataset.hub_split=train")
    for key, file, split in (("val_file", val_file, hub_val_split), ("test_file", test_file, hub_test_split)):
        if file is not None and split is not None and hub is not None:
            problems.append(f"dataset.{key}={file} and dataset.hub_{key.split('_')[0]}_split={split} are both set: "
                            "give one (a file, or a split of dataset.hub)")
    if problems:
        raise SFTError("invalid dataset:\n  - " + "\n  - ".join(problems))
    val = {"dataset.val_file": val_file} if val_file is not None else {}
    test = {"dataset.test_file": test_file} if test_file is not None else {}
    if hub is not None:
        loaded = _load(hub, hub_config, {k: v for k, v in splits.items() if v is not None})
        train = {"dataset.hub": loaded["hub_split"]}
        val = val or ({"dataset.hub_val_split": loaded["hub_val_split"]} if "hub_val_split" in loaded else {})
        test = test or ({"dataset.hub_test_split": loaded["hub_test_split"]} if "hub_test_split" in loaded else {})
        return Sources(train, val, test)
    if train_files is None:
        return Sources({"dataset.train_file": train_file}, val, test)
    train = {f"dataset.train_files[{i}]": file for i, file in enumerate(train_files)}
    if mix is None:
        return Sources(train, val, test)
    weights = [float(r) / sum(mix) for r in mix]
    if not math.isclose(sum(mix), 1.0, rel_tol=1e-6):
        log.info(f"dataset.mix={list(mix)} sums to {sum(mix):g}: normalised to {[round(w, 4) for w in weights]}")
    return Sources(train, val, test, weights)


def _train_problems(train_file, train_files, mix, hub) -> list[str]:
    """What is wrong with the keys naming the training data: none or several sources, a mix that does not fit
    its files, a train file that does not exist (each by its key and path)."""
    given = [k for k, v in (("dataset.train_file", train_file), ("dataset.train_files", train_files),
                            ("dataset.hub", hub)) if v is not None]
    if not given:
        return [NO_TRAIN]
    problems = []
    if len(given) > 1:
        problems.append(f"{' and '.join(given)} are set together: give one source of training data (a file, "
                        "several files with dataset.train_files, or a hub dataset) and set the other(s) to null")
    if mix is not None and train_files is None:
        problems.append(f"dataset.mix={mix} weighs dataset.train_files, which is not set: give the files, e.g. "
                        "dataset.train_files=[a.jsonl,b.jsonl] dataset.mix=[0.7,0.3]")
    if train_files is None:
        return problems
    if isinstance(train_files, str) or not isinstance(train_files, (list, tuple)) or not train_files:
        return problems + [f"dataset.train_files={train_files!r} must be a non-empty list of files, e.g. "
                           "dataset.train_files=[a.jsonl,b.jsonl] (one file: dataset.train_file=a.jsonl)"]
    for i, file in enumerate(train_files):
        path = Path(to_absolute_path(str(file)))
        if not path.is_file():
            problems.append(f"dataset.train_files[{i}]={file}: no such file ({path})")
    if mix is None:
        return problems
    if isinstance(mix, str) or not isinstance(mix, (list, tuple)):
        return problems + [f"dataset.mix={mix!r} must be a list of ratios, one per file of dataset.train_files, "
                           "e.g. dataset.mix=[0.7,0.3]"]
    if len(mix) != len(train_files):
        problems.append(f"dataset.mix has {len(mix)} ratio(s) for {len(train_files)} file(s) in dataset.train_files: "
                        "give one ratio per file, in the same order")
    for i, ratio in enumerate(mix):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < math.inf:
            problems.append(f"dataset.mix[{i}]={ratio!r} must be a positive number (the ratios are normalised to "
                            "sum 1; leave a file out of dataset.train_files rather than give it 0)")
    return problems


def _load(hub: str, config: str | None, named: dict[str, str]) -> dict[str, HubSplit]:
    """The named splits ({key: split name}) of dataset.hub as {key: HubSplit}: a folder saved with
    save_to_disk (a Dataset alone is the split `train`), a folder of data files, or a hub name."""
    try:
        import datasets
    except ImportError:
        raise SFTError(f"dataset.hub={hub} needs the optional `datasets` library: {install_command('hub')}. "
                       "Or give files: dataset.train_file=chats.jsonl") from None
    folder = Path(to_absolute_path(str(Path(hub).expanduser())))
    if folder.is_dir():
        if config is not None:
            raise SFTError(f"dataset.hub_config={config}: dataset.hub={hub} is a local folder, which has no "
                           "configurations; set dataset.hub_config=null")
        saved = (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()
        try:
            loaded = datasets.load_from_disk(str(folder)) if saved else datasets.load_dataset(str(folder))
        except Exception as e:  # `datasets` raises many types for a folder it cannot read
            raise SFTError(f"dataset.hub={hub}: the folder {folder} could not be read as a dataset "
                           f"({type(e).__name__}: {str(e)[:300]}). Give a folder saved with Dataset.save_to_disk or "
                           "DatasetDict.save_to_disk, or one holding .jsonl/.json/.parquet/.csv data files.") from None
    elif hub.startswith(("/", "./", "../", "~")) or folder.exists():  # a path, not a hub name
        raise SFTError(f"dataset.hub={hub}: no such folder ({folder}). Give a folder saved with save_to_disk, or "
                       "a hub dataset's name such as HuggingFaceH4/no_robots.")
    else:
        try:
            loaded = datasets.load_dataset(hub, config)
        except Exception as e:  # offline, an unknown name, a missing or unknown configuration, ...
            raise SFTError(
                f"dataset.hub={hub}" + (f" (dataset.hub_config={config})" if config else "") +
                f" could not be loaded ({type(e).__name__}: {str(e)[:300]}). Check the name (huggingface.co/"
                "datasets/<name>) and, for a dataset with several configurations, set dataset.hub_config; the "
                "first load needs network access (later runs read the cache, also with HF_DATASETS_OFFLINE=1); "
                "or give a folder saved with save_to_disk.") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = {"train": loaded}
    available = list(loaded)
    missing = [not_one_of(f"dataset.{key}", name, available) for key, name in named.items() if name not in loaded]
    if missing:
        raise SFTError(f"{'; '.join(missing)} (the splits of dataset.hub={hub}). Name one of its splits"
                       + (", or set dataset.hub_val_split/hub_test_split=null (validation is then carved from "
                          "train with dataset.val_size)" if set(named) - {"hub_split"} else "") + ".")
    return {key: HubSplit(hub, name, loaded[name]) for key, name in named.items()}


def version(source, rows: list) -> list:
    """What the token cache keys a source's contents by: a file's path, size and modification time; a hub
    split's name and a digest of its records as read (a dataset saved again with other rows is another entry)."""
    if isinstance(source, HubSplit):
        digest = hashlib.sha256(json.dumps([parsed for _, parsed in rows], sort_keys=True).encode()).hexdigest()
        return [str(source), digest]
    stat = source.stat()
    return [str(source), stat.st_size, stat.st_mtime_ns]


def draw(sizes: list[int], weights: list[float], seed: int) -> tuple[list[int], list[int]]:
    """(indices into the files' examples laid end to end, how many each file gave) for a mix: as many examples
    as the files hold together, file i giving weights[i] of them (rounded by largest remainder, so the counts
    add up). A file asked for fewer than it holds gives a random subset; for more, each of its examples once
    per pass, the last pass a random subset (so counts differ by at most one). The list is shuffled; one torch
    generator seeded with `seed` makes every choice, so the same seed draws the same list in the same order."""
    total = sum(sizes)
    exact = [w * total for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])  # largest remainder first
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    generator = torch.Generator().manual_seed(seed)
    indices, start = [], 0
    for size, count in zip(sizes, counts):
        picks: list[int] = []
        while len(picks) < count:
            picks += torch.randperm(size, generator=generator).tolist()
        indices += [start + j for j in picks[:count]]
        start += size
    order = torch.randperm(len(indices), generator=generator).tolist()
    return [indices[i] for i in order], counts


def mixed(train, origin: list[int], paths: dict[str, object], weights: list[float] | None, seed: int):
    """(training split, summary.json's train_mix) of several train files: `train` holds their examples end to
    end (origin: each one's file, in order); with `weights` (dataset.mix, normalised) the split is draw()'s list,
    without, every example once. train_mix gives per file (by its key) its path, the examples it holds once
    validation is carved, how many the split draws from it and their share of it."""
    sizes = [origin.count(k) for k in range(len(paths))]
    indices, counts = draw(sizes, weights, seed) if weights else (None, sizes)
    total = max(sum(counts), 1)
    facts = {key: {"file": str(path), "examples": size, "drawn": count, "share": round(count / total, 4)}
             for (key, path), size, count in zip(paths.items(), sizes, counts)}
    how = f"dataset.mix, drawn once with dataset.mix_seed={seed}" if weights else "no dataset.mix: every example once"
    log.info(f"training examples from {len(paths)} files ({how}): " + "; ".join(
        f"{fact['file']}: {fact['drawn']} of its {fact['examples']} ({fact['share']:.1%})" for fact in facts.values()))
    for key, fact in facts.items():
        if fact["drawn"] == 0:
            log.warning(f"{key}={fact['file']}: its ratio draws no example of {sum(counts)}; raise its "
                        "dataset.mix ratio")
    return (train if indices is None else train.subset(indices)), facts
