"""Generated-answer metrics of the causal-LM task: each val (or test) prompt answered greedily and compared with
its reference response. What they mean (the README's "Judge the answers" says the same):

- exact_match: normalise(answer) == normalise(reference), see `normalise`;
- contains: normalise(reference) appears in normalise(answer);
- regex (task.answer_regex set): the pattern is found in the raw answer (re.search; anchor it with ^...$);
- json_valid: the raw answer parses as a JSON object or array (a bare number, string or true does not count);
- json_match (task.answer_json_keys set): answer and reference are JSON objects and agree on every listed key
  (a key missing from both agrees);
- rouge_l (task.rouge_l=true, with the rouge extra): the ROUGE-L F-measure of answer and reference (rouge-score's
  longest common subsequence of words), see `rouge_l`;
- ends_turn: the answer ended with EOS or the end-of-turn token within task.sample_tokens new tokens;
- your own, task.answer_metrics.<name>: {_target_: module.function}, called as function(prompt, answer,
  reference) -> a number or a bool; `prompt` is the question as written (the last user turn, or the prompt /
  instruction), `answer` and `reference` the texts. Extra keys of the node are passed as keyword arguments.

Each metric is the mean over the judged answers (0 to 1 for the built-in ones).
"""

import importlib.util
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache

from omegaconf import DictConfig, OmegaConf

from sft_cli import config
from sft_cli.errors import SFTError
from sft_cli.extras import install_command

BUILT_IN = ("exact_match", "contains", "json_valid", "ends_turn")  # always reported when answers are judged
OPTIONAL = ("regex", "json_match", "rouge_l")  # reported when configured (task.answer_regex, ...)
TRAILING = ".,;:!?…。！？"  # sentence punctuation that normalise() cuts from the end
_MISSING = object()


def normalise(text: str) -> str:
    """What exact_match and contains compare: the text stripped, case-folded, every run of whitespace (newlines
    included) made one space, and trailing sentence punctuation (. , ; : ! ? … and their CJK forms) removed, with
    the space before it. Quotes, brackets and braces are kept, so JSON answers still compare key by key."""
    return " ".join(text.casefold().split()).rstrip(TRAILING + " ")


def exact_match(answer: str, reference: str) -> bool:
    return normalise(answer) == normalise(reference)


def contains(answer: str, reference: str) -> bool:
    return normalise(reference) in normalise(answer)


def _json(text: str):
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return _MISSING
    return value if isinstance(value, (dict, list)) else _MISSING


def json_valid(answer: str) -> bool:
    return _json(answer.strip()) is not _MISSING


def json_match(answer: str, reference: str, keys: list[str]) -> bool:
    got, wanted = _json(answer.strip()), _json(reference.strip())
    if not (isinstance(got, dict) and isinstance(wanted, dict)):
        return False
    return all(got.get(k, _MISSING) == wanted.get(k, _MISSING) for k in keys)


# Chinese and Japanese characters (and kana) are words of their own: those scripts write no spaces
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


class Words:
    """The words rouge_l compares: runs of letters and digits of the case-folded text, of any script, and each
    Chinese or Japanese character alone. On ASCII text these are exactly rouge-score's default words (lower-cased
    [a-z0-9] runs); that default drops every other letter, so it would score a German or Chinese answer on its
    ASCII words alone."""

    def tokenize(self, text: str) -> list[str]:  # what rouge_score.RougeScorer(tokenizer=) calls
        return _WORD.findall(text.casefold())


@cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=Words())


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score's `rougeL`: the longest common subsequence of the two texts' words, no
    stemming); 0 when either has no word."""
    return _rouge_scorer().score(reference, answer)["rougeL"].fmeasure


@dataclass(frozen=True)
class Answer:
    prompt: str     # the question as written (what a custom metric receives as `prompt`)
    answer: str
    reference: str
    ended: bool     # ended with EOS / end of turn within the token budget


class AnswerMetrics:
    """The metrics configured for a run (task.answer_regex, task.answer_json_keys, task.answer_metrics), checked
    when the task is built so that a bad pattern or target stops the run before any data loads."""

    def __init__(self, regex: str | None = None, json_keys: list[str] | None = None,
                 custom: dict | DictConfig | None = None, rouge: bool = False):
        self.regex = None
        if regex is not None:
            try:
                self.regex = re.compile(str(regex))
            except re.error as e:
                raise SFTError(f"task.answer_regex={regex!r} is not a valid regular expression ({e}): fix the "
                               "pattern (Python's re syntax), or set task.answer_regex=null") from e
        if json_keys is not None and (isinstance(json_keys, str) or not all(isinstance(k, str) for k in json_keys)
                                      or not json_keys):
            raise SFTError(f"task.answer_json_keys={json_keys!r} must be a non-empty list of key names, such as "
                           "[answer] or [answer,confidence], or null")
        self.json_keys = list(json_keys) if json_keys is not None else None
        if not isinstance(rouge, bool):
            raise SFTError(f"task.rouge_l={rouge!r} must be true or false")
        if rouge and importlib.util.find_spec("rouge_score") is None:
            raise SFTError("task.rouge_l=true scores answers with rouge-score, which is not installed: "
                           + install_command("rouge"))
        self.rouge = rouge
        self.custom: dict[str, Callable] = {}
        for name, node in (custom or {}).items():
            if name in (*BUILT_IN, *OPTIONAL, "loss", "perplexity", "token_accuracy"):
                raise SFTError(f"task.answer_metrics.{name}: {name} is a metric the task reports already; give "
                               "your metric another name")
            if callable(node):  # built already (a node with _partial_: true, in a task config built recursively)
                self.custom[name] = node
                continue
            if not isinstance(node, Mapping) or "_target_" not in node:
                raise SFTError(f"task.answer_metrics.{name} must be a node with a _target_ (a function taking "
                               f"prompt, answer, reference), e.g. +task.answer_metrics.{name}._target_=my_module.fn")
            try:
                self.custom[name] = config.build(OmegaConf.create(dict(node)), _partial_=True)
            except SFTError as e:
                raise SFTError(f"task.answer_metrics.{name}: {e}") from e

    @property
    def names(self) -> tuple[str, ...]:
        return (*BUILT_IN, *(("regex",) if self.regex else ()), *(("json_match",) if self.json_keys else ()),
                *(("rouge_l",) if self.rouge else ()), *self.custom)

    def off(self) -> dict[str, str]:
        """The optional metrics this config leaves out, each with what turns it on."""
        how = {"regex": "task.answer_regex=PATTERN (a pattern the answers must contain)",
               "json_match": "task.answer_json_keys=[KEY,...] (the keys answer and reference JSON must agree on)",
               "rouge_l": f"task.rouge_l=true (with rouge-score: {install_command('rouge')})"}
        return {name: f"val/{name} is reported only with {how[name]}" for name in OPTIONAL if name not in self.names}

    def scores(self, item: Answer) -> dict[str, float]:
        """Every metric of one answer (1.0/0.0 for the built-in ones)."""
        out = {"exact_match": exact_match(item.answer, item.reference), "contains": contains(item.answer, item.reference),
               "json_valid": json_valid(item.answer), "ends_turn": item.ended}
        if self.regex:
            out["regex"] = self.regex.search(item.answer) is not None
        if self.json_keys:
            out["json_match"] = json_match(item.answer, item.reference, self.json_keys)
        if self.rouge:
            out["rouge_l"] = rouge_l(item.answer, item.reference)
        for name, metric in self.custom.items():
            try:
                value = metric(item.prompt, item.answer, item.reference)
                out[name] = float(value)
            except Exception as e:
                raise SFTError(f"task.answer_metrics.{name} failed on the answer {item.answer[:80]!r} to "
                               f"{item.prompt[:80]!r} ({type(e).__name__}: {e}): it must take (prompt, answer, "
                               "reference) and return a number or a bool") from e
        return {k: float(v) for k, v in out.items()}

    def means(self, rows: list[dict]) -> dict[str, float]:
        return {name: sum(r[name] for r in rows) / len(rows) for name in self.names}
