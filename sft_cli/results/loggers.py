"""Experiment trackers beside the run's own files: TensorBoard and MLflow, chosen by the `logger` group.

metrics.jsonl stays the source of truth; a tracker only mirrors it, never touches the run's files, and never
stops training: one that raises is warned about once and switched off. Importable without torch.
"""

import importlib.util
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sft_cli.disk import write_atomic
from sft_cli.errors import SFTError
from sft_cli.extras import install_command
from sft_cli.results.folders import png_size

log = logging.getLogger(__name__)

STATE = "loggers.json"  # in the run folder: the MLflow run id and the TensorBoard folder, for resume
NOT_SCALARS = ("step", "split", "elapsed")  # record keys that are not curves (elapsed: the event time says it)
UNSPLIT = ("lr", "epoch")  # curves shared by train and val records: logged under their own name
_STATE_LOCK = threading.Lock()


def check(cfg_logger) -> list[str]:
    """Problems with the chosen loggers (a missing package names its pip extra), without importing them."""
    problems = []
    for name, node in (cfg_logger or {}).items():
        target = node.get("_target_") if isinstance(node, (dict, DictConfig)) else None
        module, _, attr = (target or "").rpartition(".")
        for package in getattr(globals().get(attr), "requires", ()) if module == __name__ else ():
            if importlib.util.find_spec(package) is None:
                # each tracker's pip extra is named after its package
                problems.append(f"logger.{name} needs {package}, which is not installed: "
                                f"{install_command(package)} (or drop it: logger=csv)")
    return problems


def build(cfg_logger, run_dir: Path, cfg, enabled: bool = True) -> "Loggers":
    """The configured loggers for this run (none on DDP ranks but 0). A missing package is an SFTError; a
    tracker that fails to start (an unreachable server) is warned about and left out, and training goes on."""
    if not enabled or not cfg_logger:
        return Loggers({})
    problems = check(cfg_logger)
    if problems:
        raise SFTError("\n".join(problems))
    from sft_cli.config import build as instantiate  # re-raises our SFTError unwrapped

    loggers = {}
    for name, node in cfg_logger.items():
        if not node or "_target_" not in node:
            continue  # csv: the run's own files, always written
        # _partial_: run_dir and cfg are runtime arguments; merged into the node, cfg's own _target_s would be built
        factory = instantiate(node, _partial_=True)
        try:
            loggers[name] = factory(run_dir=Path(run_dir), cfg=cfg)
        except Exception as e:  # noqa: BLE001 - any failure of a tracker leaves training running
            log.warning(f"logger {name} could not start ({type(e).__name__}: {e}); the run goes on without it")
    return Loggers(loggers)


def continue_from(source_run_dir: Path, run_dir: Path, step: int | None = None) -> None:
    """Start a resumed run's folder with its source's tracker history: a copy of its TensorBoard folder and its
    loggers.json (so MLflow re-opens the same run). With `step` (the checkpoint's), TensorBoard hides the
    source's points after it, as copy_history does for metrics.jsonl. Call it before build()."""
    source_run_dir, run_dir = Path(source_run_dir), Path(run_dir)
    state = _state(source_run_dir)
    log_dir = state.get("tensorboard", {}).get("log_dir", "tensorboard")
    if not Path(log_dir).is_absolute() and (source_run_dir / log_dir).is_dir():
        shutil.copytree(source_run_dir / log_dir, run_dir / log_dir, dirs_exist_ok=True)
    state.pop("resume_step", None)  # the source's own resume point, if it was itself resumed
    if step is not None:
        state["resume_step"] = int(step)
    if state:
        _write_state(run_dir, state)


class Loggers:
    """Fans each call out to the configured loggers. They receive plain Python numbers (read from the device
    where metrics.jsonl's record was), so they add no host-device sync."""

    def __init__(self, loggers: dict):
        self.active = dict(loggers)

    def __bool__(self) -> bool:
        return bool(self.active)

    def metrics(self, record: dict) -> None:
        """A metrics.jsonl record: `<split>/<metric>` scalars (and lr, epoch) at record["step"]."""
        self._call("metrics", record)

    def summary(self, summary: dict) -> None:
        """The run's summary.json: test metrics as `test/<metric>`, the other numbers as `summary/<key>`."""
        self._call("summary", summary)

    def image(self, name: str, path: Path) -> None:
        self._call("image", name, Path(path))

    def text(self, name: str, text: str) -> None:
        """Markdown text: generated samples, misclassified examples."""
        self._call("text", name, text)

    def checkpoint(self, path: Path) -> None:
        """A checkpoint folder; uploaded only by trackers configured to (logger.mlflow.log_checkpoints=true)."""
        self._call("checkpoint", Path(path))

    def close(self, failed: bool = False) -> None:
        self._call("close", failed)
        self.active.clear()

    def _call(self, method: str, *args) -> None:
        for name, logger in list(self.active.items()):
            try:
                getattr(logger, method)(*args)
            except Exception as e:  # noqa: BLE001 - a full disk or a broken server must not stop training
                del self.active[name]  # not closed: closing a broken tracker could fail or hang again
                where = getattr(logger, "failed_in", None) or f"in {method}()"  # MLflow's thread may fail earlier
                log.warning(f"logger {name} failed {where} ({type(e).__name__}: {e}); it is off for the rest of "
                            "the run, which goes on (metrics.jsonl has every record)")


class TensorBoard:
    """Event files in <run_dir>/<log_dir>: scalars, the config (as hparams and text), images and text."""

    requires = ("tensorboard",)

    def __init__(self, run_dir: Path, cfg, log_dir: str = "tensorboard"):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        _quiet_writer_threads()
        resume_step = _state(run_dir).get("resume_step")
        # purge_step: points of the copied source history at or after it are hidden (a checkpoint's future)
        self.writer = SummaryWriter(str(Path(run_dir) / log_dir),
                                    purge_step=None if resume_step is None else resume_step + 1)
        self.step = resume_step or 0
        _remember(run_dir, "tensorboard", {"log_dir": log_dir})
        monitor = OmegaConf.select(_as_config(cfg), "trainer.monitor", default=None)
        for summary in hparams(flat_config(cfg), {monitor: float("nan")} if monitor else {}):
            self._write(summary)
        self.writer.add_text("config", _indented(OmegaConf.to_yaml(_tree(cfg, resolve=False))), self.step)

    def metrics(self, record: dict) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self.step = int(record["step"])
        # one event per record, not one per scalar as add_scalar writes
        self._write(Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in scalars(record)]))

    def summary(self, summary: dict) -> None:
        for tag, value in summary_scalars(summary):
            self.writer.add_scalar(tag, value, summary.get("steps") or self.step)
        self.writer.add_text("summary", _indented(json.dumps(summary, indent=2, default=str)), self.step)

    def image(self, name: str, path: Path) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        data = path.read_bytes()  # written as is: TensorBoard decodes PNG itself, so no PIL round trip
        width, height, channels = png_size(data)
        image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=data)
        self._write(Summary(value=[Summary.Value(tag=name, image=image)]))

    def text(self, name: str, text: str) -> None:
        self.writer.add_text(name, text, self.step)

    def checkpoint(self, path: Path) -> None:
        pass  # checkpoints stay in the run folder

    def close(self, failed: bool = False) -> None:
        self.writer.close()  # flushes

    def _write(self, summary) -> None:
        self.writer._get_file_writer().add_summary(summary, self.step)  # what add_scalar itself calls


def _quiet_writer_threads() -> None:
    """Keep threading's traceback of a failed TensorBoard writer thread (a full or vanished disk) off the
    console: the writer keeps the error and raises it on the next write, where Loggers warns once."""
    previous = threading.excepthook
    if getattr(previous, "sft_cli", False):
        return

    def hook(args) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)

    hook.sft_cli = True
    threading.excepthook = hook


class MLflow:
    """One MLflow run per training run in experiment `experiment` (default: cfg.name); a resumed run re-opens
    its source's run. tracking_uri null: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/outputs/mlflow.db.

    Everything MLflow does runs on one background thread, in order: importing mlflow takes ~1.1 s, creating
    the sqlite store ~2 s and each log_batch 5-15 ms (sqlite), none of which training should wait for. An error there
    is raised by the next call (or close), which is how Loggers learns of it."""

    requires = ("mlflow",)
    close_wait_s = 120  # at close, how long the thread may take to send what is queued

    def __init__(self, run_dir: Path, cfg, tracking_uri: str | None = None, experiment: str | None = None,
                 log_checkpoints: bool = False):
        self.log_checkpoints, self.error, self.failed_in, self.queue = log_checkpoints, None, None, queue.SimpleQueue()
        run_dir = Path(run_dir)
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
        name = experiment or _as_config(cfg).get("name") or "default"
        params = {key: str(value) for key, value in flat_config(cfg).items()}  # read here: cfg is not thread-safe
        tags = {"run_dir": str(run_dir.absolute()), **_sweep_tags()}
        config = _tree(cfg, resolve=False)
        threading.Thread(target=self._work, name="sft-cli-mlflow", daemon=True).start()
        self._submit(self._start, run_dir, uri, name, params, tags, config)

    def metrics(self, record: dict) -> None:
        self._submit(self._log, list(scalars(record)), int(record["step"]), int(time.time() * 1000))

    def summary(self, summary: dict) -> None:
        step, now = int(summary.get("steps") or 0), int(time.time() * 1000)
        self._submit(self._log, list(summary_scalars(summary)), step, now)
        self._submit(lambda: self.client.log_dict(self.run_id, summary, "summary.json"))

    def image(self, name: str, path: Path) -> None:
        self._submit(lambda: self.client.log_artifact(self.run_id, str(path), "plots"))

    def text(self, name: str, text: str) -> None:
        self._submit(lambda: self.client.log_text(self.run_id, text, f"text/{_key(name)}.md"))

    def checkpoint(self, path: Path) -> None:
        if self.log_checkpoints:
            folder = str(path.resolve())  # `best` is a link to the checkpoint's folder
            self._submit(lambda: self.client.log_artifacts(self.run_id, folder, f"checkpoints/{path.name}"))

    def close(self, failed: bool = False) -> None:
        self._submit(lambda: self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED"))
        done = threading.Event()
        self.queue.put(done)
        if not done.wait(self.close_wait_s):
            raise TimeoutError(f"still sending after {self.close_wait_s} s; the rest is dropped")
        if self.error is not None:
            raise self.error

    def _submit(self, job, *args) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((job, *args))

    def _work(self) -> None:
        while True:
            job = self.queue.get()
            if isinstance(job, threading.Event):  # close() waits for it
                job.set()
                return
            if self.error is None:  # after an error, drain: the run is dropped
                try:
                    job[0](*job[1:])
                except BaseException as e:  # noqa: BLE001 - handed to the training thread by _submit
                    self.error, self.failed_in = e, "while starting" if job[0] == self._start else None

    def _start(self, run_dir: Path, uri: str, name: str, params: dict, tags: dict, config: dict) -> None:
        # a tracker must not stall a run: MLflow's HTTP client retries 7 times, 120 s each, by default
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines on creating the sqlite store
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient
        from mlflow.utils import validation

        self.Metric, self.client = Metric, MlflowClient(uri)
        previous = _state(run_dir).get("mlflow", {}).get("run_id")
        run = _existing_run(self.client, previous) if previous else None
        if previous and run is None:
            log.warning(f"logger mlflow: run {previous} of the resumed run is not in {uri}; starting a new one")
        if run is None:
            run = self.client.create_run(_experiment_id(self.client, name, uri), tags=tags,
                                         run_name=_run_name(run_dir))
        else:  # resumed: params are immutable in MLflow, so changed values go to tags
            self.client.update_run(run.info.run_id, status="RUNNING")
            old = run.data.params
            tags |= {f"resumed.{k}": v for k, v in params.items() if k in old and old[k] != _cut(v, validation)}
            params = {k: v for k, v in params.items() if k not in old}
        self.run_id = run.info.run_id
        _remember(run_dir, "mlflow", {"run_id": self.run_id, "tracking_uri": uri})
        key, limit = validation.MAX_ENTITY_KEY_LENGTH, validation.MAX_PARAMS_TAGS_PER_BATCH
        entries = [Param(_key(k)[:key], _cut(v, validation)) for k, v in params.items()]
        entries += [RunTag(_key(k)[:key], str(v)[:validation.MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
        for start in range(0, len(entries), limit):  # a batch takes at most 100 params and tags
            chunk = entries[start:start + limit]
            self.client.log_batch(self.run_id, params=[e for e in chunk if isinstance(e, Param)],
                                  tags=[e for e in chunk if isinstance(e, RunTag)])
        self.client.log_dict(self.run_id, config, "config.yaml")

    def _log(self, values: list, step: int, now: int) -> None:
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, step) for k, v in values])


def default_tracking_uri() -> str:
    """sqlite:///<cwd>/outputs/mlflow.db: one store for every run and sweep started from this folder."""
    root = Path.cwd() / "outputs"
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def flat_config(cfg) -> dict:
    """The resolved config as dotted keys (the logger node left out): lists and dicts as JSON strings."""
    try:
        tree = _tree(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation is logged as written
        tree = _tree(cfg, resolve=False)
    flat = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = json.dumps(value, default=str) if isinstance(value, (dict, list)) else value

    walk(tree, "")
    return flat


def _tree(cfg, resolve: bool) -> dict:
    """The config as plain containers, without the logger node: a tracking URI may carry credentials."""
    tree = OmegaConf.to_container(_as_config(cfg), resolve=resolve, throw_on_missing=False)
    return {key: value for key, value in tree.items() if key != "logger"}


def scalars(record: dict):
    """(tag, value) for each number of a metrics record: `<split>/<key>`, and lr and epoch as they are."""
    split = record.get("split", "train")
    for key, value in record.items():
        if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
            yield (key if key in UNSPLIT else f"{split}/{key}"), float(value)


def summary_scalars(summary: dict):
    """(tag, value): `test/<metric>` for the final test, `summary/<key>` for the other numbers."""
    for key, value in (summary.get("test") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"test/{key}", float(value)
    for key, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"summary/{key}", float(value)


def _existing_run(client, run_id: str):
    try:
        return client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MlflowException(RESOURCE_DOES_NOT_EXIST): another store
        return None


def _experiment_id(client, name: str, uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):  # artifacts beside the database, not in ./mlruns of wherever we run
        folder = Path(uri[len("sqlite:///"):]).parent / "mlruns-artifacts" / re.sub(r"[^\w.-]", "_", name)
        artifacts = folder.as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except Exception:  # another job of the sweep created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _sweep_tags() -> dict:
    """Under `sft-train -m`: the sweep folder (filter on tags.sweep), the job number and its overrides."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    hydra = HydraConfig.get()
    return {"sweep": str(Path(hydra.sweep.dir).absolute()), "sweep_job": str(hydra.job.num),
            "overrides": " ".join(hydra.overrides.task)}


def _run_name(run_dir: Path) -> str:
    return f"{Path(run_dir).parent.name}/{Path(run_dir).name}"  # <date>/<time>, or <sweep time>/<job number>


def _cut(value: str, validation) -> str:
    """A param value within MLflow's limit (6000 characters; 500 before 2.x), its end marked as cut."""
    limit = getattr(validation, "MAX_PARAM_VAL_LENGTH", 500)
    return value if len(value) <= limit else value[:limit - 3] + "..."


def _key(key: str) -> str:
    return re.sub(r"[^\w./ :-]", "_", str(key))  # the characters MLflow accepts in a key


def _as_config(cfg) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg or {})


def _indented(text: str) -> str:
    return "".join(f"    {line}\n" for line in text.splitlines())  # a markdown code block for TensorBoard


def _state(run_dir: Path) -> dict:
    path = Path(run_dir) / STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(run_dir: Path, state: dict) -> None:
    path = Path(run_dir) / STATE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(state, indent=2))


def _remember(run_dir: Path, key: str, value: dict) -> None:
    with _STATE_LOCK:  # MLflow's thread and TensorBoard both write their entry
        _write_state(run_dir, _state(run_dir) | {key: value})
