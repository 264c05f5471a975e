"""The causal-LM task's generated-answer metrics on crafted answers: the normalisation exact_match and contains
compare, each metric, the optional ones (regex, json_match) appearing only when configured, a user's own metric
named by `_target_`, and mistakes named by their key. No model: answers.py alone (the task's use of it in a
run is in test_cli_chat.py)."""

import pytest
from omegaconf import OmegaConf

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
