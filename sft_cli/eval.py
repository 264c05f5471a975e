"""sft-eval: evaluate a checkpoint on the test (or val) split of its dataset, from the checkpoint alone.

Writes eval.json (the task's metrics and details: for a classifier accuracy, macro-F1, per-class
precision/recall/F1 and the confusion matrix) into its own output folder, never into the checkpoint's; for a
language model also answers.jsonl (each judged prompt, its reference, the generated answer and its scores).
"""

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from sft_cli import checks
from sft_cli.errors import SFTError, not_one_of
from sft_cli.results import console
from sft_cli.train import evaluate
from sft_cli.training import checkpoint, loading, restore, runtime

log = logging.getLogger("sft_cli.eval")


def evaluate_checkpoint(cfg: DictConfig, out_dir: Path) -> dict:
    """Rebuild the checkpoint's data and model, evaluate one split, write eval.json into `out_dir`."""
    checks.require(cfg)
    if cfg.split not in ("test", "val"):
        raise SFTError(not_one_of("split", cfg.split, ("test", "val")))
    ckpt = checkpoint.resolve(cfg.checkpoint)
    device = runtime.pick_device(cfg.trainer.device)
    task, model = restore.load_model(cfg, ckpt, device)
    info = task.info()

    splits = task.data(cfg.dataset)
    for key, value in task.info().items():
        if value != info[key]:
            raise SFTError(f"the dataset's {key} {value} differ from the checkpoint's {info[key]}: evaluate on "
                           "data with the same classes (check the dataset.* overrides).")
    if getattr(splits, cfg.split) is None:
        raise SFTError(f"dataset <{cfg.dataset._target_}> has no test split here: use split=val, or give the "
                       "data a test split (an image folder's root/test/<class>/, or dataset.test_file=...).")

    task.set_loss(cfg.loss, splits, model)
    batch = cfg.trainer.eval_batch_size or 2 * cfg.trainer.batch_size
    options = loading.LoaderOptions(device, cfg.trainer.num_workers)
    loader = loading.make_loader(splits, cfg.split, batch, options)
    result = evaluate(task, model, loader, device, cfg.trainer.precision, cfg.split)
    answers = result.pop("answers", None)  # a language model's judged answers: a file of their own

    samples = len(getattr(splits, cfg.split))
    report = {"checkpoint": str(ckpt.resolve()), "split": cfg.split, "samples": samples, **info, **result}
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    if answers is not None:
        with open(out_dir / "answers.jsonl", "w") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in answers)
        log.info(f"wrote {out_dir / 'answers.jsonl'}: {len(answers)} answers beside their references")
    console.print_key_values(f"{cfg.split} split of {ckpt}", {k: result[k] for k in task.metrics if k in result}
                             | {"samples": samples})
    if "classes" in info:
        console.print_class_report(info["classes"], result)
    elif isinstance(result.get("per_type"), dict):  # a window's scores per type (entity types of a tagger)
        console.print_rows("per type", result["per_type"])
    log.info(f"wrote {out_dir / 'eval.json'}")
    try:
        from sft_cli.results.report import eval_report  # matplotlib, only now

        log.info(f"report: {eval_report(out_dir)}")
    except Exception as error:  # the evaluation is written; a plot that fails is a warning
        log.warning(f"could not draw the report ({type(error).__name__}: {error}); sft-report {out_dir} retries")
    return report
