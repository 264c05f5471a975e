"""The causal-LM task's generated-answer metrics on crafted answers: the normalisation exact_match and contains
compare, each metric, the optional ones (regex, json_match, rouge_l) appearing only when configured, a user's own
metric named by `_target_`, and mistakes named by their key; trainer.monitor naming a metric the config turns off
says what turns it on, before any data loads. No model: answers.py alone (the task's use of it in a run is in
test_cli_chat.py)."""

import importlib.util

import pytest
from omegaconf import OmegaConf

from sft_cli import checks, sweep
from sft_cli.errors import SFTError
from sft_cli.tasks.causal_lm import answers
from sft_cli.tasks.causal_lm.answers import Answer, AnswerMetrics


def words_in_prompt(prompt: str, answer: str, reference: str, weight: float = 1.0) -> float:
    """A user's metric: the share of the answer's words that the prompt holds (x weight)."""
    words = answer.split()
    return weight * sum(w in prompt.split() for w in words) / max(len(words), 1)


def broken(prompt: str, answer: str, reference: str):
    return None  # not a number


@pytest.mark.parametrize("text, normalised", [
    ("  Paris.  ", "paris"),                 # strip, case, a trailing full stop
    ("The  answer\n\tis   42 !?", "the answer is 42"),  # whitespace runs (newlines, tabs) -> one space
    ("Yes…", "yes"), ("好。", "好"),          # ellipsis and CJK full stop
    ('{"a": "B"}', '{"a": "b"}'),            # braces and quotes are not punctuation to cut
    ("e.g. this", "e.g. this"),              # only trailing punctuation goes
    ("Straße", "strasse"),                   # case-folded, not only lower-cased
])
def test_normalise_strips_folds_case_joins_whitespace_and_cuts_trailing_punctuation(text, normalised):
    assert answers.normalise(text) == normalised


def test_exact_match_and_contains_compare_the_normalised_texts():
    assert answers.exact_match("paris", "Paris.") and answers.exact_match("Red\n", "red")
    assert not answers.exact_match("Paris, France", "Paris")
    assert answers.contains("The capital is PARIS, France.", "paris.") and not answers.contains("Lyon", "Paris")


@pytest.mark.parametrize("answer, valid", [
    ('{"answer": 4}', True), ("[1, 2]", True), (' {"a": 1}\n', True),
    ("42", False), ('"text"', False), ("true", False),    # bare JSON scalars do not count
    ('{"answer": 4', False), ("```json\n{}\n```", False), ("", False),
])
def test_json_valid_needs_an_object_or_an_array(answer, valid):
    assert answers.json_valid(answer) is valid


def test_json_match_compares_the_listed_keys_only():
    reference = '{"answer": "Paris", "confidence": "high"}'
    assert answers.json_match('{"confidence": "high", "answer": "Paris", "extra": 1}', reference, ["answer"])
    assert not answers.json_match('{"answer": "paris", "confidence": "high"}', reference, ["answer"])  # exact values
    assert answers.json_match('{"answer": "Lyon", "confidence": "high"}', reference, ["confidence"])
    assert not answers.json_match('{"confidence": "high"}', reference, ["answer"])  # missing from the answer
    assert answers.json_match('{"a": 1}', '{"a": 1}', ["b"])  # missing from both: they agree
    assert not answers.json_match("Paris", reference, ["answer"]) and not answers.json_match("[1]", "[1]", ["a"])


def test_the_built_in_metrics_of_one_answer_and_their_means():
    metrics = AnswerMetrics()
    assert metrics.names == ("exact_match", "contains", "json_valid", "ends_turn")  # regex/json_match: only if set
    right = metrics.scores(Answer("colour of sky", "Blue.", "blue", ended=True))
    cut = metrics.scores(Answer("colour of sky", "blue sky blue sky", "blue", ended=False))
    assert right == {"exact_match": 1.0, "contains": 1.0, "json_valid": 0.0, "ends_turn": 1.0}
    assert cut == {"exact_match": 0.0, "contains": 1.0, "json_valid": 0.0, "ends_turn": 0.0}
    assert metrics.means([right, cut]) == {"exact_match": 0.5, "contains": 1.0, "json_valid": 0.0, "ends_turn": 0.5}


def test_regex_json_match_and_a_users_own_metric_are_reported_when_configured():
    custom = OmegaConf.create({"echo": {"_target_": "test_answers.words_in_prompt", "weight": 2.0}})
    metrics = AnswerMetrics(regex=r"^\{.*\}$", json_keys=["confidence"], custom=custom)
    assert metrics.names == ("exact_match", "contains", "json_valid", "ends_turn", "regex", "json_match", "echo")
    scores = metrics.scores(Answer("what is 2 plus 2", '{"answer": 4, "confidence": "high"}',
                                   '{"answer": 5, "confidence": "high"}', ended=True))
    assert scores["regex"] == 1.0 and scores["json_match"] == 1.0 and scores["exact_match"] == 0.0
    assert scores["echo"] == 0.0  # no word of the answer is in the prompt
    assert metrics.scores(Answer("say plus two", "plus two", "x", True))["echo"] == 2.0  # every word, x weight
    assert metrics.scores(Answer("q", "no braces", "x", True))["regex"] == 0.0


@pytest.mark.parametrize("kwargs, expected", [
    ({"regex": "(unclosed"}, "task.answer_regex='(unclosed' is not a valid regular expression"),
    ({"json_keys": "answer"}, "task.answer_json_keys='answer' must be a non-empty list"),
    ({"custom": {"exact_match": {"_target_": "test_answers.broken"}}}, "task.answer_metrics.exact_match: exact_match is a metric"),
    ({"custom": {"mine": "test_answers.broken"}}, "task.answer_metrics.mine must be a node with a _target_"),
    ({"custom": {"mine": {"_target_": "no_such_module.fn"}}}, "task.answer_metrics.mine: could not build <no_such_module.fn>"),
])
def test_configuration_mistakes_name_the_key(kwargs, expected):
    with pytest.raises(SFTError, match=None) as error:
        AnswerMetrics(**kwargs)
    assert expected in str(error.value)


def test_a_metric_that_returns_no_number_is_an_error_naming_it():
    metrics = AnswerMetrics(custom={"mine": {"_target_": "test_answers.broken"}})
    with pytest.raises(SFTError) as error:
        metrics.scores(Answer("q", "a", "r", True))
    assert "task.answer_metrics.mine failed on the answer 'a'" in str(error.value)
    assert "return a number or a bool" in str(error.value)


@pytest.mark.parametrize("key, value, expected", [
    ("generate_samples", -1, "task.generate_samples=-1 must be a whole number, at least 0 (0: no generated-answer"),
    ("generate_every_n_validations", 0, "task.generate_every_n_validations=0 must be a whole number, at least 1"),
    ("generate_batch_size", 2.5, "task.generate_batch_size=2.5 must be a whole number, at least 1"),
])
def test_the_tasks_generation_keys_are_checked_when_it_is_built(key, value, expected):
    from sft_cli.tasks.causal_lm.task import CausalLMTask

    with pytest.raises(SFTError) as error:
        CausalLMTask(**{key: value})
    assert expected in str(error.value)


def test_the_answer_metrics_are_the_tasks_metrics_only_when_answers_are_generated():
    from sft_cli.tasks.causal_lm.task import CausalLMTask

    assert CausalLMTask().metrics == ("loss", "perplexity", "token_accuracy", *answers.BUILT_IN)
    assert CausalLMTask(generate_samples=0).metrics == ("loss", "perplexity", "token_accuracy")
    assert CausalLMTask(answer_regex="x", answer_json_keys=["a"]).metrics[-2:] == ("regex", "json_match")
    assert set(CausalLMTask(answer_regex="x").metrics) <= set(CausalLMTask.metrics)  # what a sweep checks against


def test_rouge_l_is_rouge_scores_longest_common_subsequence_f_measure_of_the_words():
    pytest.importorskip("rouge_score")
    from rouge_score import rouge_scorer

    assert answers.rouge_l("Blue.", "blue") == 1.0 and answers.rouge_l("red", "blue") == 0.0
    # 5 of the 6 words in order: precision = recall = F = 5/6
    assert answers.rouge_l("the cat lay on the mat", "The cat sat on the mat.") == pytest.approx(5 / 6)
    # an order that breaks the subsequence: "the cat" (2 words) of 4 and 3
    assert answers.rouge_l("mat the cat", "the cat on mat") == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert answers.rouge_l("", "blue") == 0.0 and answers.rouge_l("...", "blue") == 0.0
    # on ASCII text, the words of rouge-score's default tokenizer: its own score
    default = rouge_scorer.RougeScorer(["rougeL"])
    for answer, reference in [("It's 42, not 7!", "it is 42"), ("a_b c-d 3.5x", "A b c D 3 5X"),
                              ("Paris is the capital of France.", "The capital of France is Paris")]:
        assert answers.rouge_l(answer, reference) == default.score(reference, answer)["rougeL"].fmeasure
    # letters of other scripts are words too (the default tokenizer drops them: 0 for both)
    assert answers.Words().tokenize("Die Straße ist lang") == ["die", "strasse", "ist", "lang"]
    assert answers.rouge_l("Die Straße ist lang.", "die strasse ist kurz") == 0.75
    assert answers.Words().tokenize("東京は大きい") == ["東", "京", "は", "大", "き", "い"]  # a character a word
    assert answers.rouge_l("東京は大きい", "東京は小さい") == pytest.approx(4 / 6)


def test_rouge_l_is_reported_when_turned_on_and_its_missing_package_is_named():
    assert "rouge_l" not in AnswerMetrics().names
    if importlib.util.find_spec("rouge_score") is None:
        with pytest.raises(SFTError, match=r"task.rouge_l=true scores answers with rouge-score, which is not "
                                           r"installed: pip install -e \".*\[rouge\]\""):
            AnswerMetrics(rouge=True)
        return
    metrics = AnswerMetrics(rouge=True, custom={"echo": {"_target_": "test_answers.words_in_prompt"}})
    assert metrics.names == ("exact_match", "contains", "json_valid", "ends_turn", "rouge_l", "echo")
    scores = [metrics.scores(Answer("q", a, "the sky is blue", True)) for a in ("The sky is blue.", "blue", "red")]
    assert [s["rouge_l"] for s in scores] == [1.0, pytest.approx(2 * 1 * 0.25 / 1.25), 0.0]
    assert metrics.means(scores)["rouge_l"] == pytest.approx((1 + 0.4) / 3)
    with pytest.raises(SFTError, match="task.rouge_l='yes' must be true or false"):
        AnswerMetrics(rouge="yes")


def test_rouge_ls_missing_package_is_one_message_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rouge_score" else real(name, *a))
    with pytest.raises(SFTError) as error:
        AnswerMetrics(rouge=True)
    assert str(error.value) == ("task.rouge_l=true scores answers with rouge-score, which is not installed: "
                                + answers.install_command("rouge"))
    assert "[rouge]" in str(error.value)


@pytest.mark.parametrize("samples, monitor, expected", [
    (0, "exact_match", "trainer.monitor=val/exact_match is not reported by this run: task.generate_samples=0 turns "
                       "the generated-answer metrics off: set task.generate_samples=16"),
    (16, "json_match", "trainer.monitor=val/json_match is not reported by this run: val/json_match is reported only "
                       "with task.answer_json_keys=[KEY,...]"),
    (16, "rouge_l", "val/rouge_l is reported only with task.rouge_l=true (with rouge-score: pip install "),
    (16, "exact_mtch", "trainer.monitor='val/exact_mtch' is not one of: val/contains, val/ends_turn, "),  # a typo
])
def test_a_monitored_answer_metric_the_config_turns_off_says_what_turns_it_on(samples, monitor, expected):
    from sft_cli.tasks.causal_lm.task import CausalLMTask

    cfg = OmegaConf.create({"trainer": {"monitor": f"val/{monitor}"}})
    task = CausalLMTask(generate_samples=samples)
    with pytest.raises(SFTError) as error:  # what train() checks once the task is built, before data loads
        checks.check_monitor(cfg, task.metrics, task.metrics_off)
    assert expected in str(error.value)
    with pytest.raises(SFTError) as error:  # and a sweep, before its first run
        sweep.check_config(["+experiment=chat_sft", "dataset.train_file=chats.jsonl", "model.name_or_path=x",
                            f"task.generate_samples={samples}", f"trainer.monitor=val/{monitor}",
                            "optimizer.lr=0.1,0.01"])
    assert expected in str(error.value)


def test_a_sweep_monitoring_a_users_own_answer_metric_starts():
    args = ["+experiment=chat_sft", "dataset.train_file=chats.jsonl", "model.name_or_path=x", "optimizer.lr=0.1,0.01"]
    sweep.check_config([*args, "+task.answer_metrics.echo._target_=test_answers.words_in_prompt",
                        "trainer.monitor=val/echo"])  # was: 'val/echo' is not one of ...
    with pytest.raises(SFTError, match=r"trainer.monitor='val/echo' is not one of: val/contains"):
        sweep.check_config([*args, "trainer.monitor=val/echo"])  # not configured: still refused
    # a swept task key may turn a metric on in some runs: the class's metrics are allowed then
    sweep.check_config([*args, "task.answer_regex=a,b", "trainer.monitor=val/regex"])


def test_metrics_csv_has_train_columns_for_the_windows_metrics_only(tmp_path):
    from sft_cli.results.metrics_files import MetricsFiles
    from sft_cli.tasks.causal_lm.task import CausalLMTask

    task = CausalLMTask(answer_regex="x")
    files = MetricsFiles(tmp_path, task.metrics, train_metrics=task.train_metrics)
    files.epoch_row({"epoch": 1, "step": 4, "train_loss": 0.5, "val_loss": 0.7, "val_exact_match": 0.25, "lr": 0.1})
    files.close()
    header, row = (tmp_path / "metrics.csv").read_text().splitlines()
    assert header.split(",") == ["epoch", "step", "train_loss", "train_perplexity", "train_token_accuracy",
                                 "val_loss", "val_perplexity", "val_token_accuracy", "val_exact_match", "val_contains",
                                 "val_json_valid", "val_ends_turn", "val_regex", "lr", "train_samples_per_s",
                                 "elapsed"]  # was: empty train_exact_match ... train_regex columns too
    assert row == "1,4,0.5,,,0.7,,,0.25,,,,,0.1,,"
    # a resumed run appends under the header its file has, whatever its own columns (an older run's: with them)
    (tmp_path / "metrics.csv").write_text("epoch,step,train_loss,train_exact_match,val_loss,val_exact_match,lr\n")
    files = MetricsFiles(tmp_path, task.metrics, train_metrics=task.train_metrics)
    files.epoch_row({"epoch": 2, "step": 8, "train_loss": 0.4, "val_loss": 0.6, "val_exact_match": 0.5, "lr": 0.1})
    files.close()
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1] == "2,8,0.4,,0.6,0.5,0.1"
    # classifiers: every metric is a train and a val column, as before
    (tmp_path / "cls").mkdir()
    MetricsFiles(tmp_path / "cls", ("loss", "accuracy")).close()
    assert (tmp_path / "cls" / "metrics.csv").read_text().startswith("epoch,step,train_loss,train_accuracy,val_loss,")
