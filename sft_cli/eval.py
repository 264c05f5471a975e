"""sft-eval: evaluate a checkpoint on the test (or val) split of its dataset, from the checkpoint alone.

Writes eval.json (accuracy, macro-F1, per-class precision/recall/F1, confusion matrix) into its own
output folder, never into the checkpoint's.
"""

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from sft_cli import checkpoint, config, console, loss, runtime
from sft_cli.errors import SFTError, not_one_of
from sft_cli.data import make_loader
from sft_cli.train import evaluate

log = logging.getLogger("sft_cli.eval")


def evaluate_checkpoint(cfg: DictConfig, out_dir: Path) -> dict:
    """Rebuild the checkpoint's data and model, evaluate one split, write eval.json into `out_dir`."""
    config.require(cfg)
    if cfg.split not in ("test", "val"):
        raise SFTError(not_one_of("split", cfg.split, ("test", "val")))
    ckpt = checkpoint.resolve(cfg.checkpoint)
    device = runtime.pick_device(cfg.trainer.device)
    model, classes = checkpoint.load_model(cfg, ckpt, device)

    splits = config.build(cfg.dataset)
    if splits.classes != classes:
        raise SFTError(f"the dataset's classes {splits.classes} differ from the checkpoint's {classes}: "
                       "evaluate on data with the same classes (check the dataset.* overrides).")
    data = splits.test if cfg.split == "test" else splits.val
    if data is None:
        raise SFTError(f"dataset <{cfg.dataset._target_}> has no test split here: use split=val, or give the "
                       "data a test split (an image folder's root/test/<class>/, or dataset.test_file=...).")

    criterion = loss.cross_entropy(cfg.loss, splits.train_targets, len(classes), device)
    batch = cfg.trainer.eval_batch_size or 2 * cfg.trainer.batch_size
    loader = make_loader(data, batch, cfg.trainer.num_workers, device, shuffle=False, collate=splits.collate)
    result = evaluate(model, loader, criterion, device, cfg.trainer.precision, len(classes))

    report = {"checkpoint": str(ckpt.resolve()), "split": cfg.split, "samples": len(data),
              "classes": classes, **result}
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    console.print_key_values(f"{cfg.split} split of {ckpt}", {k: result[k] for k in ("accuracy", "macro_f1", "loss")}
                             | {"samples": len(data)})
    console.print_class_report(classes, result)
    log.info(f"wrote {out_dir / 'eval.json'}")
    return report
