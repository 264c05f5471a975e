"""A run's metric files: metrics.jsonl and metrics.csv, written as the loop reads its windows."""

import json


class MetricsFiles:
    """metrics.jsonl (a record per logging interval and per validation) and metrics.csv (a row per epoch, with
    train_ and val_ columns for each metric the task reports) in the run folder, and every record to the
    configured trackers. Each write is flushed, so a killed run keeps everything up to its last record. With
    enabled=False (DDP ranks but 0) it writes nothing."""

    def __init__(self, run_dir, metrics: tuple[str, ...], enabled: bool = True, trackers=None):
        self.enabled, self.trackers = enabled, trackers  # trackers: loggers.Loggers (TensorBoard, MLflow), or None
        self.columns = ("epoch", "step", *(f"{split}_{m}" for split in ("train", "val") for m in metrics), "lr",
                        "train_samples_per_s", "elapsed")
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self.csv = open(run_dir / "metrics.csv", "a")
        if self.csv.tell() == 0:
            self.csv.write(",".join(self.columns) + "\n")
            self.csv.flush()

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
