"""A run's metric files: metrics.jsonl and metrics.csv, written as the loop reads its windows."""

import json


class MetricsFiles:
    """metrics.jsonl (a record per logging interval and per validation) and metrics.csv (a row per epoch, with
    a train_ column for each of `train_metrics` (default: `metrics`; a language model's generated-answer
    metrics are judged on validation only) and a val_ column for each of `metrics`) in the run folder, and every
    record to the configured trackers. Each write is flushed, so a killed run keeps everything up to its last
    record. A resumed run appends to the metrics.csv it continues under that file's own header. With
    enabled=False (DDP ranks but 0) it writes nothing."""

    def __init__(self, run_dir, metrics: tuple[str, ...], enabled: bool = True, trackers=None,
                 train_metrics: tuple[str, ...] | None = None):
        self.enabled, self.trackers = enabled, trackers  # trackers: loggers.Loggers (TensorBoard, MLflow), or None
        train_metrics = metrics if train_metrics is None else train_metrics
        self.columns = ("epoch", "step", *(f"train_{m}" for m in train_metrics), *(f"val_{m}" for m in metrics),
                        "lr", "train_samples_per_s", "elapsed")
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self.csv = open(run_dir / "metrics.csv", "a")
        if self.csv.tell() == 0:
            self.csv.write(",".join(self.columns) + "\n")
            self.csv.flush()
        else:  # rows go under the columns the file has (one an earlier version or config wrote may differ)
            with open(run_dir / "metrics.csv") as f:
                self.columns = tuple(f.readline().rstrip("\n").split(","))

    def record(self, record: dict) -> None:
        if self.enabled:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
            if self.trackers:  # plain numbers, read from the device already: no extra sync
                self.trackers.metrics(record)

    def epoch_row(self, row: dict) -> None:
        if self.enabled:
            self.csv.write(",".join(_csv_value(row.get(c)) for c in self.columns) + "\n")
            self.csv.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.csv.close()


def _csv_value(value) -> str:
    return "" if value is None else str(value)  # str(float) round-trips exactly
