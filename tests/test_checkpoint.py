"""checkpoint.py: atomic, durable saves; loading with errors that name the file and the fix."""

import argparse
import logging
import os
import pickle
import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from sft_cli.errors import SFTError
from sft_cli.models.parts import Parts
from sft_cli.training import checkpoint


def tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(body=nn.Linear(4, 3), act=nn.ReLU(), fc=nn.Linear(3, 2)))
    model.sft = Parts([("body", ["body"]), ("fc", ["fc"])], new_stages=["fc"])
    return model


CLASSES = ["cat", "dog"]


def save(folder, step, tags, model):
    state = {"step": step, "epoch": step // 10, "best": 0.5, "rng": {"torch": torch.get_rng_state()},
             "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict()}
    cfg = OmegaConf.create({"seed": 1, "trainer": {"max_epochs": 3}, "model": {"name": "tiny"},
                            "dataset": {"name": "toy"}, "lr": "${seed}"})
    meta = {"classes": CLASSES, "epoch": step // 10, "step": step}
    return checkpoint.save(folder, tags, model, state, cfg, meta)


def steps_on_disk(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("step-"))


def test_save_points_tags_and_removes_unreferenced_step_folders(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    model = tiny_model()
    save(folder, 10, ["last", "best"], model)
    assert os.readlink(folder / "last") == os.readlink(folder / "best") == "step-00000010"
    save(folder, 20, ["last"], model)
    assert os.readlink(folder / "last") == "step-00000020"
    assert os.readlink(folder / "best") == "step-00000010"
    assert steps_on_disk(folder) == ["step-00000010", "step-00000020"]
    save(folder, 30, ["last", "best"], model)
    assert os.readlink(folder / "last") == os.readlink(folder / "best") == "step-00000030"
    assert steps_on_disk(folder) == ["step-00000030"]
    assert sorted(p.name for p in folder.iterdir()) == ["best", "last", "step-00000030"]  # no temporaries left


def test_saved_files_load_with_plain_readers(tmp_path):
    model = tiny_model()
    ckpt = save(tmp_path / "checkpoints", 20, ["last", "best"], model)
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 20 and state["best"] == 0.5
    assert state["rng"]["torch"].dtype == torch.uint8 and state["optimizer"]["param_groups"][0]["lr"] == 0.1
    fresh = nn.Sequential(OrderedDict(body=nn.Linear(4, 3), act=nn.ReLU(), fc=nn.Linear(3, 2)))
    fresh.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert checkpoint.load_meta(ckpt) == {"classes": CLASSES, "epoch": 2, "step": 20}
    assert checkpoint.load_config(ckpt).lr == 1  # written resolved


def test_load_weights_and_state_round_trip(tmp_path):
    model = tiny_model()
    ckpt = save(tmp_path / "checkpoints", 10, ["last"], model)
    fresh = tiny_model()
    torch.nn.init.zeros_(fresh.body.weight)
    checkpoint.load_weights(ckpt, fresh)
    assert torch.equal(fresh.body.weight, model.body.weight)
    assert checkpoint.load_state(ckpt)["step"] == 10


def test_load_weights_into_another_architecture_is_an_error_naming_the_file(tmp_path):
    ckpt = save(tmp_path / "checkpoints", 10, ["last"], tiny_model())
    with pytest.raises(SFTError, match="model.safetensors"):
        other = nn.Linear(4, 2)
        other.sft = Parts([("all", [""])], new_stages=[])
        checkpoint.load_weights(ckpt, other)


FULL_DISK = {
    "safetensors": SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                   'message: "No space left on device" })'),
    "torch.save OSError": OSError(28, "No space left on device"),
    "torch.save RuntimeError": RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 320 vs 0: "
                                            "No space left on device"),
}


def fill_disk(monkeypatch, case):
    def boom(*args, **kwargs):
        raise FULL_DISK[case]

    if case == "safetensors":
        monkeypatch.setattr(safetensors.torch, "save_file", boom)
    else:
        monkeypatch.setattr(torch, "save", boom)


@pytest.mark.parametrize("case", FULL_DISK)
def test_a_failed_save_leaves_last_on_the_previous_complete_checkpoint(tmp_path, monkeypatch, case):
    folder = tmp_path / "run" / "checkpoints"
    model = tiny_model()
    save(folder, 10, ["last", "best"], model)
    saved_weight = model.body.weight.detach().clone()
    fill_disk(monkeypatch, case)
    with torch.no_grad():
        model.body.weight.add_(1.0)
    with pytest.raises(SFTError) as e:
        save(folder, 20, ["last", "best"], model)
    monkeypatch.undo()
    message = str(e.value)
    assert f"the checkpoint step-00000020 could not be written to {folder}" in message
    assert "No space left on device" in message
    assert f"checkpoints/last still points at the previous complete checkpoint {folder / 'step-00000010'}" in message
    assert f"Free space on that disk, then continue the run with resume={folder.parent}." in message

    assert sorted(p.name for p in folder.iterdir()) == ["best", "last", "step-00000010"]  # no temporary folder
    for tag in ("last", "best"):
        ckpt = checkpoint.resolve(folder / tag)
        assert ckpt.resolve().name == "step-00000010"
        assert sorted(p.name for p in ckpt.iterdir()) == ["config.yaml", "meta.json", "model.safetensors",
                                                          "state.pt"]
        fresh = tiny_model()
        checkpoint.load_weights(ckpt, fresh)
        assert torch.equal(fresh.body.weight, saved_weight)
        assert checkpoint.load_state(ckpt)["step"] == 10
    # the next save of the same step succeeds
    save(folder, 20, ["last"], model)
    assert os.readlink(folder / "last") == "step-00000020"
    assert sorted(p.name for p in folder.iterdir()) == ["best", "last", "step-00000010", "step-00000020"]


def test_a_failed_first_save_says_there_is_no_checkpoint_yet(tmp_path, monkeypatch):
    folder = tmp_path / "run" / "checkpoints"
    fill_disk(monkeypatch, "torch.save OSError")
    with pytest.raises(SFTError, match="there is no complete checkpoint of this run yet. Free space on that disk, "
                                       "then start the run again."):
        save(folder, 10, ["last", "best"], tiny_model())
    assert list(folder.iterdir()) == []


def test_a_save_into_a_folder_that_refuses_writes_says_so_even_when_its_cleanup_fails_too(tmp_path, monkeypatch):
    folder = tmp_path / "run" / "checkpoints"
    save(folder, 10, ["last", "best"], tiny_model())

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(torch, "save", denied)
    monkeypatch.setattr(Path, "unlink", denied)  # the cleanup of the temporary links is refused as well
    with pytest.raises(SFTError, match=rf"Permission denied.*Make {re.escape(str(folder))} writable, then continue"):
        save(folder, 20, ["last"], tiny_model())
    monkeypatch.undo()
    assert os.readlink(folder / "last") == "step-00000010"


def test_save_syncs_every_file_and_folder_before_and_after_each_rename(tmp_path, monkeypatch):
    """A power cut can only leave `last` on a complete checkpoint: the files and their folder reach the disk
    before the rename, the rename before `last` is re-pointed, and each re-pointing before the save returns."""
    folder = tmp_path / "run" / "checkpoints"
    model = tiny_model()
    save(folder, 10, ["last", "best"], model)
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or replace(a, b))
    save(folder, 20, ["last", "best"], model)

    where = str(folder.resolve())
    renames = [i for i, e in enumerate(events) if e[0] == "replace"]
    assert [Path(events[i][2]).name for i in renames] == ["step-00000020", "last", "best"]
    tmp = str(Path(events[renames[0]][1]).resolve())
    assert Path(tmp).name == f".step-00000020.tmp-{os.getpid()}"
    synced = [e[1] for e in events[:renames[0]]]
    assert sorted(Path(p).name for p in synced if Path(p).parent == Path(tmp)) == \
        ["config.yaml", "meta.json", "model.safetensors", "state.pt"]
    assert synced[-1] == tmp  # the folder, after its files
    for i in renames:
        assert events[i + 1] == ("fsync", where)  # the rename is on disk before the next step
    assert sorted(p.name for p in folder.iterdir()) == ["best", "last", "step-00000020"]


def fake_step(folder: Path, name: str, mib: int = 1) -> Path:
    (folder / name).mkdir()
    (folder / name / "model.safetensors").write_bytes(b"\0" * (mib * 2**20))
    return folder / name


@pytest.fixture
def pids():
    """(a live process's pid, a finished process's pid)"""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    yield live.pid, dead.pid
    live.kill()
    live.wait()


def test_a_save_keeps_the_temporary_folders_of_a_live_process(tmp_path, pids):
    """Another process may be writing into the same folder: only dead processes' leftovers (and this one's
    own, from a failed save) are removed."""
    live, dead = pids
    folder = tmp_path / "run" / "checkpoints"
    model = tiny_model()
    save(folder, 10, ["last", "best"], model)
    for pid in (live, dead, os.getpid()):
        fake_step(folder, f".step-00000020.tmp-{pid}")
        (folder / f".last.tmp-{pid}").symlink_to("step-00000010")
    save(folder, 30, ["last", "best"], model)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["best", "last", "step-00000030", f".step-00000020.tmp-{live}", f".last.tmp-{live}"])


def test_clear_stale_removes_dead_processes_leftovers_and_logs_the_space_freed(tmp_path, pids, caplog):
    live, dead = pids
    folder = tmp_path / "run" / "checkpoints"
    save(folder, 10, ["last", "best"], tiny_model())
    fake_step(folder, f".step-00000020.tmp-{dead}", mib=3)
    fake_step(folder, f".step-00000030.tmp-{live}")
    (folder / f".best.tmp-{dead}").symlink_to("step-00000010")
    with caplog.at_level(logging.INFO, logger="sft_cli.training.checkpoint"):
        checkpoint.clear_stale(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["best", "last", "step-00000010", f".step-00000030.tmp-{live}"])
    assert f"removed 2 temporary checkpoint file(s) left in {folder} by stopped runs, freeing 3.0 MiB" in caplog.text
    caplog.clear()
    checkpoint.clear_stale(folder)  # nothing left to clear: silent
    checkpoint.clear_stale(tmp_path / "no-such-folder")
    assert caplog.text == ""


def test_a_run_killed_during_its_first_save_has_its_partial_save_removed_when_named(tmp_path, pids):
    live, dead = pids
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    fake_step(run / "checkpoints", f".step-00000005.tmp-{dead}", mib=2)  # SIGKILL mid-save: nothing but this
    with pytest.raises(SFTError, match="stopped during its first save: the unfinished save in .* was removed"):
        checkpoint.resolve(run)
    assert list((run / "checkpoints").iterdir()) == []  # it was kept for good before
    fake_step(run / "checkpoints", f".step-00000005.tmp-{live}")  # a live run's save in progress is left alone
    with pytest.raises(SFTError, match="holds no checkpoint") as error:
        checkpoint.resolve(run)
    assert "first save" not in str(error.value) and (run / "checkpoints" / f".step-00000005.tmp-{live}").is_dir()


def test_ctrl_c_during_a_save_leaves_no_temporary_folder(tmp_path, monkeypatch):
    folder = tmp_path / "run" / "checkpoints"
    save(folder, 10, ["last", "best"], tiny_model())
    real = checkpoint._write

    def interrupted(tmp, *args):
        real(tmp, *args)
        raise KeyboardInterrupt  # after the files, before the rename

    monkeypatch.setattr(checkpoint, "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(folder, 20, ["last", "best"], tiny_model())
    assert sorted(p.name for p in folder.iterdir()) == ["best", "last", "step-00000010"]


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_model_file_is_an_error_naming_it(tmp_path):
    ckpt = save(tmp_path / "checkpoints", 10, ["last"], tiny_model())
    truncate(ckpt / "model.safetensors")
    with pytest.raises(SFTError, match="model.safetensors") as e:
        checkpoint.load_weights(ckpt, tiny_model())
    assert str(ckpt) in str(e.value)


def test_truncated_state_file_is_an_error_naming_it(tmp_path):
    ckpt = save(tmp_path / "checkpoints", 10, ["last"], tiny_model())
    truncate(ckpt / "state.pt")
    with pytest.raises(SFTError, match="state.pt"):
        checkpoint.load_state(ckpt)


def test_missing_state_file_is_an_error_saying_the_checkpoint_is_incomplete(tmp_path):
    ckpt = save(tmp_path / "checkpoints", 10, ["last"], tiny_model())
    (ckpt / "state.pt").unlink()
    with pytest.raises(SFTError, match="incomplete: state.pt is missing"):
        checkpoint.load_state(ckpt)


def write_pickle(path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"step": 10, "args": argparse.Namespace(lr=0.1)}, f)


@pytest.mark.parametrize("writer,what", [
    (lambda p: torch.save({"step": 10, "args": argparse.Namespace(lr=0.1)}, p),
     "it holds pickled Python objects (argparse.Namespace), which sft-cli never writes"),
    (write_pickle, "it is not a weights-only torch file"),
])
def test_a_state_file_holding_pickled_objects_must_not_be_loaded(tmp_path, writer, what):
    ckpt = save(tmp_path / "checkpoints", 10, ["last"], tiny_model())
    writer(ckpt / "state.pt")
    with pytest.raises(SFTError) as e:
        checkpoint.load_state(ckpt)
    message = str(e.value)
    assert f"checkpoint file {ckpt / 'state.pt'} is not a checkpoint sft-cli wrote: {what}" in message
    assert "It must not be loaded" in message and "Use another checkpoint of the run." in message
    assert "weights_only" not in message and "add_safe_globals" not in message  # torch's advice runs the payload
    assert e.value.__cause__ is None and e.value.__suppress_context__


@pytest.mark.parametrize("text,why", [
    ("trainer: [1, 2\nmodel: x\n", "it is not valid YAML: while parsing a flow sequence"),
    ("- trainer\n- model\n", "it holds a YAML list, not a mapping"),
    ("42\n", "it holds a YAML int, not a mapping"),
    ("seed: 1\nmodel: {name: resnet18}\n", "it has no trainer, dataset section"),
    ("", "it has no trainer, model, dataset section"),
])
def test_a_config_that_is_not_an_sft_cli_config_is_an_error_naming_it(tmp_path, text, why):
    ckpt = save(tmp_path / "checkpoints", 10, ["last"], tiny_model())
    (ckpt / "config.yaml").write_text(text)
    with pytest.raises(SFTError) as e:
        checkpoint.load_config(ckpt)
    assert str(e.value) == (f"{ckpt / 'config.yaml'} is not an sft-cli checkpoint config ({why}). Use another "
                            "checkpoint of the run (its checkpoints/best or checkpoints/last).")


def unreadable(path: Path, monkeypatch) -> None:
    """Make reading `path` fail: chmod 000 where that blocks reads; as root, where it does not, make
    opening it raise as the system would."""
    if os.geteuid() != 0:
        path.chmod(0)
        return
    opener = Path.open

    def refuse(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return opener(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt", "config.yaml", "meta.json"])
def test_an_unreadable_checkpoint_file_is_an_error_naming_it(tmp_path, monkeypatch, name):
    ckpt = save(tmp_path / "checkpoints", 10, ["last"], tiny_model())
    unreadable(ckpt / name, monkeypatch)
    load = {"model.safetensors": lambda: checkpoint.load_weights(ckpt, tiny_model()),
            "state.pt": lambda: checkpoint.load_state(ckpt), "config.yaml": lambda: checkpoint.load_config(ckpt),
            "meta.json": lambda: checkpoint.load_meta(ckpt)}[name]
    with pytest.raises(SFTError) as e:
        load()
    assert str(e.value) == (f"checkpoint file {ckpt / name} is not readable (Permission denied): check its "
                            "permissions, and those of the folders above it.")


def test_resolve_accepts_run_dir_checkpoints_dir_tag_link_and_file_inside(tmp_path):
    run = tmp_path / "outputs" / "run"
    folder = run / "checkpoints"
    model = tiny_model()
    save(folder, 10, ["last", "best"], model)
    save(folder, 20, ["last"], model)
    for given in (run, str(run), folder, folder / "last", folder / "last" / "model.safetensors",
                  folder / "step-00000020" / "meta.json"):
        assert checkpoint.resolve(given).resolve() == (folder / "step-00000020").resolve(), given
    assert checkpoint.resolve(folder / "best").resolve() == (folder / "step-00000010").resolve()


def test_resolve_rejects_missing_paths_and_folders_without_a_checkpoint(tmp_path):
    with pytest.raises(SFTError, match="does not exist"):
        checkpoint.resolve(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SFTError, match="holds no checkpoint"):
        checkpoint.resolve(tmp_path / "empty")


def test_resolve_names_a_dangling_last_and_the_intact_best(tmp_path):
    run = tmp_path / "outputs" / "run"
    folder = run / "checkpoints"
    model = tiny_model()
    save(folder, 10, ["last", "best"], model)
    save(folder, 20, ["last"], model)
    os.rename(folder / "step-00000020", tmp_path / "moved")  # e.g. deleted by hand, or lost in a copy
    expected = (f"{folder}: last points at step-00000020, which is missing; best is intact: "
                f"resume={folder / 'best'} (or checkpoint={folder / 'best'} for sft-eval and sft-predict).")
    for given in (run, folder, folder / "last"):
        with pytest.raises(SFTError) as e:
            checkpoint.resolve(given)
        assert str(e.value) == expected, given
    assert checkpoint.resolve(folder / "best").resolve() == (folder / "step-00000010").resolve()


def test_resolve_says_when_last_and_best_both_dangle(tmp_path):
    run = tmp_path / "run"
    folder = run / "checkpoints"
    model = tiny_model()
    save(folder, 10, ["best"], model)
    save(folder, 20, ["last"], model)
    for step in ("step-00000010", "step-00000020"):
        os.rename(folder / step, tmp_path / step)
    with pytest.raises(SFTError) as e:
        checkpoint.resolve(run)
    assert str(e.value) == (f"{folder}: last points at step-00000020 and best points at step-00000010, which are "
                            "both missing: no complete checkpoint of this run is left. Start the run again, or "
                            "give another run's checkpoint.")


def test_an_unlistable_checkpoint_folder_is_an_error_naming_it(tmp_path, monkeypatch):
    run = tmp_path / "run"
    save(run / "checkpoints", 10, ["last", "best"], tiny_model())
    stat = os.stat

    def refuse(path, *args, **kwargs):  # what stat() of a file inside a folder without x permission raises
        if str(path).startswith(str(run / "checkpoints" / "last") + "/"):
            raise PermissionError(13, "Permission denied", str(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", refuse)
    with pytest.raises(SFTError, match="is not readable \\(Permission denied\\): check its permissions") as e:
        checkpoint.resolve(run)
    assert str(run / "checkpoints" / "last") in str(e.value)


def test_resolve_and_load_config_do_not_import_torch(tmp_path):
    """The CLI's config checks call them and must answer in about a second; importing torch takes longer."""
    run = tmp_path / "run"
    save(run / "checkpoints", 10, ["last", "best"], tiny_model())
    code = ("import sys; from sft_cli.training import checkpoint; "
            f"checkpoint.load_config(checkpoint.resolve({str(run)!r})); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'safetensors.torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_run_killed_before_its_first_metrics_row_and_validation_resumes_into_a_clean_history(tmp_path):
    source = tmp_path / "source"
    (source / "checkpoints").mkdir(parents=True)
    (source / "metrics.csv").write_text("")  # killed before the header reached the disk
    step = source / "checkpoints" / "step-00000005"
    step.mkdir()
    (step / checkpoint.MODEL_FILE).write_bytes(b"weights")
    (source / "checkpoints" / "last").symlink_to("step-00000005")
    checkpoint.copy_history(source / "checkpoints" / "last", tmp_path / "resumed", epoch=0, step=5)
    folder = tmp_path / "resumed" / "checkpoints"
    assert (folder / "last").resolve().name == "step-00000005"
    assert not (folder / "best").exists()  # never validated: no best until the resumed run validates
    assert not (tmp_path / "resumed" / "metrics.csv").exists()


def test_an_empty_checkpoint_path_says_it_is_empty_not_that_it_holds_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Path("") is the current folder, which holds no checkpoint
    for empty in ("", "  "):
        with pytest.raises(SFTError, match=r"^checkpoint= is empty: give a run folder"):
            checkpoint.resolve(empty)


def test_a_metrics_line_cut_by_a_kill_is_left_out_of_the_resumed_history_with_a_warning(tmp_path, caplog):
    source = tmp_path / "source"
    step = source / "checkpoints" / "step-00000005"
    step.mkdir(parents=True)
    (step / checkpoint.MODEL_FILE).write_bytes(b"weights")
    (source / "checkpoints" / "last").symlink_to("step-00000005")
    whole = ['{"epoch": 1, "step": 2, "split": "train", "loss": 1.0}', '{"epoch": 1, "step": 4, "split": "val"}']
    (source / "metrics.jsonl").write_text("\n".join(whole) + '\n{"epoch": 1, "step": 5, "spl')  # killed mid-write
    with caplog.at_level(logging.WARNING):
        checkpoint.copy_history(source / "checkpoints" / "last", tmp_path / "resumed", epoch=1, step=5)
    assert (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines() == whole
    assert any("metrics.jsonl:3 is cut short" in r.getMessage() for r in caplog.records)
