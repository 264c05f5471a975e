"""Every user mistake gives one clear message naming the key or path, exit code 1, no traceback,
and nothing already on disk is changed."""

import hashlib
import shutil
from pathlib import Path

import pytest

from sft_cli.errors import SFTError
from sft_cli.extras import install_command
from sft_cli.models import vision

from conftest import FAST, run_cli


def refused(result, *expected: str) -> None:
    assert result.returncode == 1, result.output[-2000:]
    assert "Traceback" not in result.output, result.output[-3000:]
    for text in expected:
        assert text in result.output, f"{text!r} not in:\n{result.output[-2000:]}"


@pytest.mark.parametrize("overrides,expected", [
    (["optimizer=rmsprop"], ["has no option 'rmsprop'", "The options of optimizer: adam, adamw, sgd"]),  # lists them
    (["trainer.epochs=3"], ["trainer.epochs", "Key 'epochs' not in"]),            # unknown key
    (["trainer.max_epochs=ten"], ["trainer.max_epochs", "could not be converted to Integer"]),  # wrong type
    (["optimizer.lr=fast", "trainer.precision=fp16", "resume=/no/such/run"],  # all problems at once
     ["optimizer.lr='fast' must be a positive number", "trainer.precision='fp16'", "resume='/no/such/run'"]),
    (["trainer.monitor=val/acc"], ["trainer.monitor='val/acc' is not one of: val/accuracy"]),  # train(): the task's
    (["freeze=lower", "freeze.until=layer9"], ["freeze.until='layer9' is not one of: stem, layer1"]),
    # Hydra's own hint for a misspelt key is to add it with +: a key nothing reads is refused, with the near one
    (["+optimiser=adamw"], ["'optimiser' is neither a key nor a config group", "Did you mean optimizer=adamw?"]),
    (["+trainer.max_step=1"], ["trainer has no key 'max_step'", "Did you mean trainer.max_steps=1?"]),
    (["+optimizer.moment=0.5"], ["torch.optim.SGD takes no argument 'moment'", "Did you mean optimizer.momentum?"]),
])
def test_config_mistakes(tmp_path: Path, overrides, expected):
    refused(run_cli("sft-train", *FAST, *overrides, cwd=tmp_path), *expected)


@pytest.mark.parametrize("args", [["+experiment=nope"], [*FAST, "optimizer=adamw2"], ["-m", *FAST, "freeze=none,head_olny"]])
def test_an_unknown_group_option_ends_with_the_options_that_exist(tmp_path: Path, args):
    result = run_cli("sft-train", *args, cwd=tmp_path)
    refused(result, "has no option")
    last = [line for line in result.output.splitlines() if line.strip()][-1]
    assert "The options of" in last and "Config search path" not in result.output, result.output[-1500:]
    if "optimizer=adamw2" in args:
        assert "did you mean optimizer=adamw?" in last


@pytest.mark.parametrize("kwargs,expected", [
    ({"name": "resnet1800"}, "model.name='resnet1800' is not one of"),
    ({"name": "resnet18", "weights": "/no/such/weights.pth"}, "model.weights=/no/such/weights.pth does not exist"),
    ({"name": "resnet18", "weights": "IMAGENET1K_V9"}, "model.weights='IMAGENET1K_V9' is not one of: IMAGENET1K_V1"),
])
def test_model_mistakes_name_the_key(kwargs, expected):
    # in-process: these raise the same SFTError that the CLI prints (as the tests above show for others)
    with pytest.raises(SFTError) as error:
        vision.torchvision_classifier(classes=["a", "b"], **kwargs)
    assert expected in str(error.value)


def test_cuda_asked_for_without_a_gpu(tmp_path: Path):
    result = run_cli("sft-train", *FAST, "trainer.device=cuda", cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})
    refused(result, "trainer.device=cuda but no CUDA GPU is visible", "trainer.device=cpu")


def test_offline_dataset_download_says_where_to_put_the_files(tmp_path: Path):
    result = run_cli("sft-train", "+experiment=cifar10_resnet18", f"dataset.root={tmp_path / 'nothing'}", cwd=tmp_path)
    refused(result, f"dataset.root={tmp_path / 'nothing'}", str(tmp_path / "nothing" / "cifar-10-batches-py"))


def test_offline_pretrained_weights_say_where_the_file_goes(tmp_path: Path):
    result = run_cli("sft-train", *FAST, "model.weights=IMAGENET1K_V1", cwd=tmp_path)
    refused(result, str(tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"),
            "model.weights=null")


def test_missing_checkpoint(tmp_path: Path):
    refused(run_cli("sft-eval", "checkpoint=/no/such/run", cwd=tmp_path), "checkpoint '/no/such/run' does not exist")
    refused(run_cli("sft-eval", cwd=tmp_path), "checkpoint")


def test_a_checkpoint_path_with_non_ascii_letters_works_quoted_and_unquoted_says_how_to_quote(quick_run: Path,
                                                                                              tmp_path: Path):
    folder = tmp_path / "modèles 日本"
    shutil.copytree(quick_run / "checkpoints" / "best", folder)  # best is a link: copy what it points at
    refused(run_cli("sft-eval", f"checkpoint={folder}", cwd=tmp_path),
            f"Hydra reads 'è' only inside quotes. Quote the value: checkpoint='{folder}'")
    result = run_cli("sft-eval", f"checkpoint='{folder}'", "hydra.run.dir=ev", cwd=tmp_path)
    assert result.returncode == 0 and (tmp_path / "ev" / "eval.json").is_file(), result.output[-2000:]
    refused(run_cli("sft-predict", f"checkpoint='{folder}'", "text=a digit", cwd=tmp_path),
            "classifies images, not text: give input=")  # was: AttributeError deep in PIL


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_corrupt_checkpoint_is_named_and_nothing_is_overwritten(quick_run: Path, tmp_path: Path):
    copy = tmp_path / "copy"
    shutil.copytree(quick_run, copy, symlinks=True)
    weights = copy / "checkpoints" / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # as if the disk filled up mid-copy
    before = digest(copy)
    refused(run_cli("sft-eval", f"checkpoint={copy}", cwd=tmp_path), str(weights.parent), "corrupt")
    refused(run_cli("sft-train", *FAST, f"resume={copy}", cwd=tmp_path), "corrupt")
    assert digest(copy) == before


def test_resume_with_another_architecture_is_refused(quick_run: Path, tmp_path: Path):
    before = digest(quick_run)
    result = run_cli("sft-train", *FAST, "model.name=resnet34", f"resume={quick_run}", cwd=tmp_path)
    refused(result, "do not fit the configured model", "model.name")
    assert digest(quick_run) == before


def test_a_run_folder_that_holds_a_run_is_never_reused(quick_run: Path, tmp_path: Path):
    before = digest(quick_run)
    result = run_cli("sft-train", *FAST, f"hydra.run.dir={quick_run}", cwd=tmp_path)
    refused(result, f"{quick_run} already holds a run")
    assert digest(quick_run) == before  # .hydra/ and train.log included: Hydra wrote nothing there
    result = run_cli("sft-eval", f"checkpoint={quick_run}", f"hydra.run.dir={quick_run / 'checkpoints' / 'ev'}",
                     cwd=tmp_path)
    refused(result, "sft-eval never writes there")
    assert digest(quick_run) == before and not (quick_run / "checkpoints" / "ev").exists()


def test_a_hub_dataset_without_the_optional_extra_says_how_to_install_it(tmp_path: Path):
    # the dev extra installs `datasets`: a package of that name that cannot be imported stands in for its absence
    (tmp_path / "absent" / "datasets").mkdir(parents=True)
    (tmp_path / "absent" / "datasets" / "__init__.py").write_text("raise ImportError(\"No module named 'datasets'\")\n")
    result = run_cli("sft-train", "+experiment=sst2_bert", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "absent")})
    refused(result, install_command("hub"), "dataset=text_files")


def test_text_file_mistakes_name_the_file_and_line(tmp_path: Path):
    (tmp_path / "reviews.tsv").write_text("text\tlabel\ngreat film\tpos\n\tneg\n")
    result = run_cli("sft-train", "+experiment=text_classification", "dataset.train_file=reviews.tsv", cwd=tmp_path)
    refused(result, "reviews.tsv:3", "dataset.skip_bad_rows=true")


def test_the_last_line_a_user_reads_is_the_fix_not_a_note_about_tracebacks(tmp_path: Path):
    for command, args, fix in (("sft-train", [*FAST, "optimizer.lr=-1"], "e.g. optimizer.lr=1e-3"),
                               ("sft-eval", [f"checkpoint={tmp_path}"], "checkpoints/best")):
        result = run_cli(command, *args, cwd=tmp_path)
        refused(result, fix)
        last = [line for line in result.output.splitlines() if line.strip()][-1]
        assert fix in last and "HYDRA_FULL_ERROR" not in result.output, result.output[-1500:]
