"""Run the real console scripts (sft-train, sft-eval) in a temp folder, offline."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
# The quickstart (ResNet-18 on digits), made cheaper with 16x16 inputs.
# One DataLoader worker: the tests that choose dataset.pipeline=torchvision run with a worker process (the
# default fast pipeline has none).
FAST = ["+experiment=quickstart", "dataset.transforms.image_size=16", "trainer.num_workers=1",
        "trainer.progress_bar=false", "report=false"]  # reports: drawn by quick_run and tests/test_report.py


# Under pytest-xdist (pytest -n 2) each worker runs its own commands: one torch thread each keeps two workers
# from fighting over two cores.
THREADS = {"OMP_NUM_THREADS": "1"} if "PYTEST_XDIST_WORKER" in os.environ else {}


def run_cli(command: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 300,
            ) -> subprocess.CompletedProcess:
    """Run `command args...` as a user would; every URL fails at once (a dead proxy), so nothing downloads."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "NO_PROXY", "no_proxy")}
    full_env.update({"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
                     "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
                     "TORCH_HOME": str(cwd / "torch_home"), "SFT_CLI_CACHE": str(cwd / "sft_cache"), "COLUMNS": "200",
                     **THREADS, **(env or {})})
    result = subprocess.run([str(BIN / command), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                            timeout=timeout)
    result.output = result.stdout + result.stderr
    return result


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.output[-3000:]
    return result


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def kill_within_an_epoch(args: list[str], cwd: Path, run_dir: str = "killed", after_epoch: int = 1) -> dict:
    """Start `sft-train args... hydra.run.dir=<run_dir>` and SIGKILL it as soon as checkpoints/last is a checkpoint
    written within an epoch, `after_epoch` epochs in or later (args must set trainer.checkpoint_every_n_steps);
    its meta.json."""
    env = {**os.environ, **THREADS, "HTTPS_PROXY": "http://127.0.0.1:9", "TORCH_HOME": str(cwd / "torch_home"),
           "SFT_CLI_CACHE": str(cwd / "sft_cache")}
    proc = subprocess.Popen([str(BIN / "sft-train"), *args, f"hydra.run.dir={run_dir}"], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    meta, deadline = None, time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        try:
            meta = json.loads((cwd / run_dir / "checkpoints" / "last" / "meta.json").read_text())
        except (OSError, ValueError):  # not written yet, or re-pointed while being read
            meta = None
        if meta and meta["batch"] > 0 and meta["epoch"] >= after_epoch:
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert meta and meta["batch"] > 0, "the run finished (or failed) before a checkpoint within an epoch"
    return meta


def assert_kill_and_resume_is_bitwise(args: list[str], cwd: Path) -> None:
    """sft-train args... killed within an epoch and resumed ends with the weights and best value of the same run
    made without a kill (args must set trainer.checkpoint_every_n_steps)."""
    import torch
    from safetensors.torch import load_file

    kill_within_an_epoch(args, cwd)
    ok(run_cli("sft-train", *args, "resume=killed", "hydra.run.dir=resumed", cwd=cwd))
    ok(run_cli("sft-train", *args, "hydra.run.dir=straight", cwd=cwd))
    resumed, straight = (load_file(cwd / run / "checkpoints" / "last" / "model.safetensors")
                         for run in ("resumed", "straight"))
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert read_json(cwd / "resumed" / "summary.json")["best_value"] == \
        read_json(cwd / "straight" / "summary.json")["best_value"]


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory) -> Path:
    """One finished 3-epoch run of the (cheapened) quickstart, shared by every test that reads one (read only:
    tests that change a run change a copy). Under pytest-xdist the first worker that needs it makes it in the
    folder all workers share, under a file lock; the others wait for it and reuse it (the pytest-xdist recipe
    for session fixtures that run once)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:  # no xdist, or -n 0
        cwd = tmp_path_factory.mktemp("quick")
        ok(run_cli("sft-train", *FAST, "trainer.max_epochs=3", "report=true", "hydra.run.dir=run", cwd=cwd))
        return cwd / "run"
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # pytest-N/, the parent of every worker's popen-gwN/
    cwd = shared / "quick"
    with FileLock(str(shared / "quick.lock")):
        if not (cwd / "done").is_file():
            shutil.rmtree(cwd, ignore_errors=True)  # a run of a worker that failed before finishing
            cwd.mkdir()
            ok(run_cli("sft-train", *FAST, "trainer.max_epochs=3", "report=true", "hydra.run.dir=run", cwd=cwd))
            (cwd / "done").write_text("")
    return cwd / "run"


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_xdist_worker():
    """In-process torch work of a test also takes one thread under xdist."""
    if THREADS:
        import torch

        torch.set_num_threads(1)
