"""Entity-level precision, recall and F1 (seqeval, strict mode, the files' tag scheme) and the on-device window
that accumulates a token classifier's predictions between two reads."""

import time
import warnings

import torch

from sft_cli.tasks.token_classification.tags import seqeval_scheme
from sft_cli.training import distributed


def span_scores(true: list[list[str]], predicted: list[list[str]], scheme: str) -> dict:
    """Micro-averaged entity precision/recall/F1 with exact span matching, word-level tag accuracy, and the
    same scores per entity type, from word-level tag sequences: seqeval's strict mode in `scheme`."""
    from seqeval.metrics import accuracy_score, classification_report

    words = sum(len(t) for t in true)
    scores = {"precision": 0.0, "recall": 0.0, "f1": 0.0,
              "token_accuracy": accuracy_score(true, predicted) if words else 0.0, "entities": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns when a type is never predicted (its precision is 0)
        try:
            report = classification_report(true, predicted, mode="strict", scheme=seqeval_scheme(scheme),
                                           output_dict=True, zero_division=0)
        except ValueError:  # no entity in either sequence: nothing to score
            return scores
    micro = report.pop("micro avg", {})
    scores |= {"precision": float(micro.get("precision", 0.0)), "recall": float(micro.get("recall", 0.0)),
               "f1": float(micro.get("f1-score", 0.0))}
    scores["entities"] = {name: {"precision": float(r["precision"]), "recall": float(r["recall"]),
                                 "f1": float(r["f1-score"]), "support": int(r["support"])}
                          for name, r in report.items() if not name.endswith(" avg")}
    return scores


class SpanWindow:
    """Running loss on the device, and each batch's predicted and true tags at the words' first sub-tokens
    (device tensors, never read in add()), between two reads. read() syncs once: it sums the loss over DDP
    processes, gathers every process's word-level sequences, puts each sentence's windows back together and
    scores them with seqeval. The token-classification task's window."""

    def __init__(self, tags: list[str], scheme: str, device: torch.device):
        self.tags, self.scheme, self.device = tags, scheme, device
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, labelled sub-tokens
        self.batches: list[tuple[torch.Tensor, ...]] = []  # (predicted, true, sentence, window) per batch
        self.start = time.perf_counter()
        self.scores: dict = {}

    def add(self, record: tuple) -> None:
        """record: (summed loss, labelled sub-tokens, predicted tag ids and true tag ids at each word's first
        sub-token and -1 elsewhere, sentence and window of each example)."""
        summed, labelled, *tensors = record
        self.sums[0] += summed
        self.sums[1] += labelled
        self.batches.append(tuple(tensors))

    def read(self) -> dict:
        """loss (per labelled sub-token), entity precision/recall/F1, token_accuracy (per word), samples
        (examples: sentences or their windows) and samples_per_s."""
        loss_sum, labelled = distributed.all_reduce_sum(self.sums)[0].tolist()
        examples = [row for rows in distributed.all_gather_objects(self._examples()) for row in rows]
        true, predicted = self._sentences(examples)
        self.scores = span_scores(true, predicted, self.scheme)
        return {"loss": loss_sum / max(labelled, 1), **{k: v for k, v in self.scores.items() if k != "entities"},
                "samples": len(examples), "samples_per_s": len(examples) / (time.perf_counter() - self.start)}

    def details(self) -> dict:
        """After read(): per entity type precision/recall/F1/support (what sft-eval shows), and the scheme."""
        return {"per_type": self.scores.get("entities", {}), "scheme": self.scheme}

    def _examples(self) -> list[tuple[int, int, list[int], list[int]]]:
        """(sentence, window, true tag ids, predicted tag ids) per example, word by word, on the host."""
        out = []
        for predicted, true, sentence, window in self.batches:
            predicted, true = predicted.cpu(), true.cpu()
            for i, (s, w) in enumerate(zip(sentence.tolist(), window.tolist())):
                words = true[i] >= 0
                out.append((s, w, true[i][words].tolist(), predicted[i][words].tolist()))
        return out

    def _sentences(self, examples: list) -> tuple[list[list[str]], list[list[str]]]:
        """Word-level tag sequences per sentence: its windows in order, each counted once (DDP pads a shard
        with repeated examples)."""
        by_sentence: dict[int, dict[int, tuple]] = {}
        for s, w, true, predicted in examples:
            by_sentence.setdefault(s, {}).setdefault(w, (true, predicted))
        true, predicted = [], []
        for s in sorted(by_sentence):
            windows = [by_sentence[s][w] for w in sorted(by_sentence[s])]
            true.append([self.tags[t] for pair in windows for t in pair[0]])
            predicted.append([self.tags[p] for pair in windows for p in pair[1]])
        return true, predicted

    def state_dict(self) -> dict:
        return {"sums": self.sums, "batches": [list(b) for b in self.batches]}

    def load_state_dict(self, state: dict) -> None:
        self.sums = state["sums"].to(self.device)
        self.batches = [tuple(t.to(self.device) for t in b) for b in state["batches"]]
