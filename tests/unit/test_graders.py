"""Graders: validation at request time, templates, dataset row checks and batch scoring."""

from __future__ import annotations

import time
from typing import Any

import pytest
from pydantic import ValidationError

from app.graders import (
    Grader,
    JsonSchemaGrader,
    MultiGrader,
    RegexGrader,
    StringCheckGrader,
    check_row,
    grade,
    grade_detailed,
    grader_adapter,
    item_fields,
    reward_model_names,
    scoring,
)


def parse(data: dict[str, Any]) -> Grader:
    return grader_adapter.validate_python(data)


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        parse(data)
    return str(caught.value)


def score(data: dict[str, Any], output: str, item: dict[str, Any] | None = None) -> float:
    return grade(parse(data), [item or {}], [output])[0]


def check(operation: str, reference: str = "{{item.answer}}") -> dict[str, Any]:
    return {"type": "string_check", "name": "check", "reference": reference, "operation": operation}


def similar(metric: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": "text_similarity",
        "name": "similar",
        "reference": "{{item.answer}}",
        "evaluation_metric": metric,
        **fields,
    }


# string_check


@pytest.mark.parametrize(
    ("operation", "output", "expected"),
    [
        ("eq", "Paris", 1.0),
        ("eq", "paris", 0.0),
        ("eq", "Paris ", 0.0),
        ("ne", "Lyon", 1.0),
        ("ne", "Paris", 0.0),
        ("like", "The capital is Paris.", 1.0),
        ("like", "The capital is PARIS.", 0.0),
        ("ilike", "The capital is PARIS.", 1.0),
        ("ilike", "Lyon", 0.0),
    ],
)
def test_string_check_operations(operation: str, output: str, expected: float) -> None:
    assert score(check(operation), output, {"answer": "Paris"}) == expected


def test_like_takes_percent_and_underscore_literally_as_openai_does() -> None:
    assert score(check("like", "50%"), "up 50% today") == 1.0
    assert score(check("like", "50%"), "up 500 today") == 0.0
    assert score(check("like", "a_b"), "axb") == 0.0


# text_similarity


def test_fuzzy_match_is_high_for_near_strings_and_low_for_others() -> None:
    near = score(similar("fuzzy_match"), "paris.", {"answer": "Paris"})
    far = score(similar("fuzzy_match"), "Copenhagen", {"answer": "Paris"})
    assert 0.7 < near < 1.0
    assert far < 0.3
    assert score(similar("fuzzy_match"), "Paris", {"answer": "Paris"}) == 1.0


def test_bleu_of_identical_text_is_one_and_of_unrelated_text_zero() -> None:
    sentence = "the quick brown fox jumps over the lazy dog"
    assert score(similar("bleu"), sentence, {"answer": sentence}) == pytest.approx(1.0)
    assert score(similar("bleu"), "completely different words", {"answer": sentence}) == 0.0


def test_rouge_scores_partial_overlap_between_zero_and_one() -> None:
    item = {"answer": "the cat sat on the mat"}
    rouge_l = score(similar("rouge_l"), "the cat lay on a mat", item)
    rouge_2 = score(similar("rouge_2"), "the cat lay on a mat", item)
    assert 0.0 < rouge_l < 1.0
    assert rouge_2 < rouge_l  # fewer shared bigrams than the shared subsequence
    assert score(similar("rouge_1"), "the cat sat on the mat", item) == pytest.approx(1.0)
    assert score(similar("rouge_5"), "mat the on sat cat the", item) == 0.0


def test_rouge_keeps_words_outside_ascii() -> None:
    item = {"answer": "Καλημέρα κόσμε"}
    assert score(similar("rouge_1"), "Καλημέρα κόσμε", item) == pytest.approx(1.0)
    assert score(similar("rouge_1"), "Καλημέρα φίλε", item) == pytest.approx(0.5)


def test_pass_threshold_turns_the_metric_into_pass_or_fail() -> None:
    grader = similar("fuzzy_match", pass_threshold=0.7)
    assert score(grader, "paris.", {"answer": "Paris"}) == 1.0
    assert score(grader, "Lyon", {"answer": "Paris"}) == 0.0


@pytest.mark.parametrize("metric", ["gleu", "meteor", "cosine"])
def test_openai_metrics_we_lack_are_refused_naming_the_supported_ones(metric: str) -> None:
    message = error_of(similar(metric))
    assert f"'{metric}' is not supported" in message
    assert "fuzzy_match, bleu, rouge_1" in message


def test_unknown_metric_and_threshold_out_of_range_are_refused() -> None:
    assert "evaluation_metric" in error_of(similar("jaccard"))
    assert "pass_threshold" in error_of(similar("bleu", pass_threshold=1.5))


# regex


def test_regex_searches_and_can_ignore_case() -> None:
    grader = {"type": "regex", "name": "answer", "pattern": r"answer: \d+$"}
    assert score(grader, "so the answer: 42") == 1.0
    assert score(grader, "so the ANSWER: 42") == 0.0
    assert score({**grader, "ignore_case": True}, "so the ANSWER: 42") == 1.0
    assert score(grader, "the answer: forty-two") == 0.0


def test_regex_pattern_that_does_not_compile_is_refused() -> None:
    message = error_of({"type": "regex", "name": "bad", "pattern": "(unclosed"})
    assert "pattern does not compile" in message
    assert "missing )" in message


def test_catastrophic_patterns_score_zero_quickly() -> None:
    text = "a" * 40 + "b"
    started = time.monotonic()
    # The regex module survives (a+)+$ on its own; (a|aa)+$ runs until the timeout stops it.
    assert score({"type": "regex", "name": "r", "pattern": "(a+)+$"}, text) == 0.0
    assert score({"type": "regex", "name": "r", "pattern": "(a|aa)+$"}, text) == 0.0
    assert time.monotonic() - started < scoring.REGEX_TIMEOUT_S + 2.0


# json_schema


SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}},
    "required": ["answer"],
}


def test_json_schema_scores_valid_json_one() -> None:
    grader = {"type": "json_schema", "name": "shape", "schema": SCHEMA}
    assert score(grader, '{"answer": 42}') == 1.0
    assert score(grader, '{"answer": "42"}') == 0.0
    assert score(grader, "answer: 42") == 0.0
    assert score(grader, '{"answer": NaN}') == 0.0


def test_json_schema_is_checked_at_request_time() -> None:
    message = error_of({"type": "json_schema", "name": "shape", "schema": {"type": "integr"}})
    assert "not a valid JSON Schema" in message


def test_json_schema_key_is_schema_both_ways() -> None:
    grader = parse({"type": "json_schema", "name": "shape", "schema": SCHEMA})
    assert isinstance(grader, JsonSchemaGrader)
    assert grader.json_schema == SCHEMA
    assert grader.model_dump()["schema"] == SCHEMA
    assert grader_adapter.validate_json(grader_adapter.dump_json(grader)) == grader
    assert parse(grader.model_dump(by_alias=True)) == grader
    assert "json_schema" in error_of({"type": "json_schema", "name": "s", "json_schema": SCHEMA})


def test_unresolvable_ref_scores_zero() -> None:
    grader = {"type": "json_schema", "name": "s", "schema": {"$ref": "https://example.com/x"}}
    assert score(grader, "{}") == 0.0


# json_equal


def test_json_equal_ignores_key_order_and_formatting() -> None:
    grader = {"type": "json_equal", "name": "eq", "reference": '{"a": 1, "b": [1, 2]}'}
    assert score(grader, '{ "b": [1, 2.0], "a": 1 }') == 1.0
    assert score(grader, '{"a": 1, "b": [2, 1]}') == 0.0
    assert score(grader, "not json") == 0.0


def test_json_equal_compares_a_single_placeholder_as_its_value() -> None:
    grader = {"type": "json_equal", "name": "eq", "reference": "{{item.expected}}"}
    item = {"expected": {"city": "Paris", "population": 2100000}}
    assert score(grader, '{"population": 2100000, "city": "Paris"}', item) == 1.0
    assert score(grader, '{"city": "Paris"}', item) == 0.0
    # A string value is JSON text.
    assert score(grader, "[1, 2]", {"expected": "[1,2]"}) == 1.0


def test_json_equal_does_not_take_true_for_one() -> None:
    grader = {"type": "json_equal", "name": "eq", "reference": "1"}
    assert score(grader, "true") == 0.0
    assert score(grader, "1.0") == 1.0


# templates


def test_templates_read_nested_fields_list_indexes_and_output_json() -> None:
    grader = check("eq", "{{ item.answer.value }}/{{item.choices.1}}")
    item = {"answer": {"value": 7}, "choices": ["x", "y"]}
    assert score(grader, "7/y", item) == 1.0

    from_json = {**check("eq", "{{item.answer}}"), "input": "{{sample.output_json.result.city}}"}
    assert score(from_json, '{"result": {"city": "Paris"}}', {"answer": "Paris"}) == 1.0
    # A completion that is not JSON, or lacks the path, renders as "".
    assert score(from_json, "Paris", {"answer": ""}) == 1.0
    assert score(from_json, '{"result": {}}', {"answer": ""}) == 1.0


def test_non_string_values_render_as_compact_json() -> None:
    grader = check("eq", "{{item.answer}}")
    assert score(grader, '{"a":[1,true,null]}', {"answer": {"a": [1, True, None]}}) == 1.0
    assert score(grader, "3.5", {"answer": 3.5}) == 1.0


@pytest.mark.parametrize(
    ("reference", "problem"),
    [
        ("{{row.answer}}", "unknown namespace 'row'"),
        ("{{item}}", "name a field of the row"),
        ("{{sample.output}}", "unknown sample field"),
        ("{{sample.output_text.x}}", "has no fields"),
        ("{{item..answer}}", "empty or blank path segment"),
    ],
)
def test_bad_placeholders_are_refused(reference: str, problem: str) -> None:
    assert problem in error_of(check("eq", reference))


def test_templates_and_patterns_have_length_caps() -> None:
    assert "10000 characters" in error_of(check("eq", "x" * 10_001))
    assert "1000 characters" in error_of({"type": "regex", "name": "r", "pattern": "a" * 1001})


# what a grader reads


def multi(calculate_output: str, **graders: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "multi",
        "name": "total",
        "graders": graders,
        "calculate_output": calculate_output,
    }


EXACT = check("eq")
FUZZY = similar("fuzzy_match")


def test_item_fields_and_check_row_name_missing_fields() -> None:
    exact = {**EXACT, "name": "exact", "reference": "{{item.answer.value}}"}
    grader = parse(
        multi(
            "exact + style",
            exact=exact,
            style={**FUZZY, "name": "style", "input": "{{item.prefix}} {{sample.output_text}}"},
        )
    )
    assert item_fields(grader) == {"answer", "prefix"}
    assert check_row(grader, {"answer": {"value": 1}, "prefix": "", "other": 2}) == []
    assert check_row(grader, {"answer": {"valu": 1}}) == [
        ("answer", "missing: grader 'exact' reads {{item.answer.value}}"),
        ("prefix", "missing: grader 'style' reads {{item.prefix}}"),
    ]
    assert ("answer", "missing: grader 'style' reads {{item.answer}}") in check_row(grader, {})
    assert check_row(grader, ["not", "an", "object"]) == [
        ("", "the row is a JSON list, not an object")
    ]


def test_a_missing_field_at_scoring_time_scores_zero() -> None:
    assert grade(parse(EXACT), [{"answer": "a"}, {}], ["a", "a"]) == [1.0, 0.0]


def test_reward_model_names_are_listed_once() -> None:
    reward = {"type": "reward_model", "name": "rm", "model": "ftjob-abc"}
    grader = parse(multi("a + b", a=reward, b={**reward, "name": "rm2"}))
    assert reward_model_names(grader) == ["ftjob-abc"]
    assert reward_model_names(parse(EXACT)) == []


# multi


def test_multi_weights_its_graders() -> None:
    grader = parse(multi("0.5 * exact + 0.5 * fuzzy", exact=EXACT, fuzzy=FUZZY))
    items = [{"answer": "Paris"}, {"answer": "Paris"}]
    totals = grade(grader, items, ["Paris", "Lyon"])
    assert totals[0] == 1.0
    assert 0.0 <= totals[1] < 0.5

    details = grade_detailed(grader, items, ["Paris", "paris."])
    assert details[0] == {"total": 1.0, "total.exact": 1.0, "total.fuzzy": 1.0}
    assert details[1]["total.exact"] == 0.0
    assert details[1]["total"] == pytest.approx(0.5 * details[1]["total.fuzzy"])


@pytest.mark.parametrize(
    ("formula", "expected"),
    [
        ("min(hit, miss)", 0.0),
        ("max(hit, miss, 0.25)", 1.0),
        ("min(hit)", 1.0),
        ("abs(-(hit - 3)) / 2", 1.0),
        ("2 * hit - 0.5 * miss + -1", 1.0),
        ("hit / 4", 0.25),
        ("(hit + miss) / (hit - hit)", 0.0),  # divides by zero
        ("hit / miss + 1", 0.0),  # divides by zero
    ],
)
def test_multi_formula_arithmetic_and_division_by_zero(formula: str, expected: float) -> None:
    hit = {**EXACT, "name": "hit", "reference": "Paris"}
    miss = {**EXACT, "name": "miss", "reference": "Lyon"}
    grader = parse(multi(formula, hit=hit, miss=miss))
    assert grade(grader, [{}], ["Paris"]) == [expected]


@pytest.mark.parametrize(
    ("formula", "problem"),
    [
        ("__import__('os').system('id')", "calling `__import__('os').system`"),
        ("__import__('os')", "calling `__import__`"),
        ("exact.__class__", "attribute access `exact.__class__`"),
        ("exact.real", "attribute access"),
        ("pow(exact, 2)", "calling `pow`"),
        ("exact ** 2", "the operator"),
        ("exact if fuzzy else 0", "IfExp"),
        ("[exact][0]", "Subscript"),
        ("'a'", "the constant 'a'"),
        ("True + exact", "the constant True"),
        ("lambda: 1", "Lambda"),
        ("wrong + exact", "unknown name 'wrong'; the graders are: exact, fuzzy"),
        ("min", "min is a function"),
        ("abs(exact, fuzzy)", "wrong number of arguments in abs()"),
        ("min(*[exact])", "unpacking"),
        ("exact +", "not a valid formula"),
        ("1e999 * exact", "too large"),
    ],
)
def test_multi_formula_refuses_anything_but_arithmetic(formula: str, problem: str) -> None:
    message = error_of(multi(formula, exact=EXACT, fuzzy=FUZZY))
    assert "calculate_output" in message
    assert problem in message


def test_multi_refuses_nesting_bad_names_and_too_many_graders() -> None:
    inner = multi("exact", exact=EXACT)
    assert "cannot contain another multi grader" in error_of(multi("inner", inner=inner))
    assert "cannot be used in a formula" in error_of(
        {**multi("exact", exact=EXACT), "graders": {"my-grader": EXACT}}
    )
    assert "is a formula function" in error_of(
        {**multi("exact", exact=EXACT), "graders": {"max": EXACT}}
    )
    eleven = {f"g{index}": EXACT for index in range(11)}
    assert "at most 10 items" in error_of(multi("g0", **eleven))
    assert "at least 1 item" in error_of(multi("1"))


def test_multi_round_trips_through_json() -> None:
    grader = parse(multi("0.5 * exact + 0.5 * fuzzy", exact=EXACT, fuzzy=FUZZY))
    assert isinstance(grader, MultiGrader)
    assert isinstance(grader.graders["exact"], StringCheckGrader)
    assert grader_adapter.validate_json(grader.model_dump_json()) == grader


# reward_model


def test_reward_model_scorer_is_called_once_per_batch_with_rendered_inputs() -> None:
    calls: list[tuple[str, list[str], list[dict[str, Any]]]] = []

    def scorer(model: str, inputs: list[str], items: list[dict[str, Any]]) -> list[float]:
        calls.append((model, inputs, items))
        return [float(len(text)) for text in inputs]

    reward = {
        "type": "reward_model",
        "name": "rm",
        "model": "ftjob-abc",
        "input": "{{item.prompt}} {{sample.output_text}}",
    }
    grader = parse(multi("rm + exact", rm=reward, exact=EXACT))
    items = [{"prompt": "Q", "answer": "A"}, {"answer": "A"}, {"prompt": "Q2", "answer": "B"}]
    totals = grade(grader, items, ["A", "A", "xyz"], reward_model_scorer=scorer)
    assert calls == [("ftjob-abc", ["Q A", "Q2 xyz"], [items[0], items[2]])]
    assert totals == [3.0 + 1.0, 0.0 + 1.0, 6.0 + 0.0]


def test_reward_model_without_scorer_or_with_a_short_answer_raises() -> None:
    grader = parse({"type": "reward_model", "name": "rm", "model": "ftjob-abc"})
    with pytest.raises(ValueError, match="pass reward_model_scorer"):
        grade(grader, [{}], ["x"])
    with pytest.raises(ValueError, match="answered 0 scores for 1 inputs"):
        grade(grader, [{}], ["x"], reward_model_scorer=lambda *_: [])
    assert grade(grader, [{}], ["x"], reward_model_scorer=lambda *_: [float("nan")]) == [0.0]


# request validation


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({**EXACT, "operation": "contains"}, "operation"),
        ({**EXACT, "unknown": 1}, "Extra inputs are not permitted"),
        ({**EXACT, "name": ""}, "at least 1 character"),
        ({**EXACT, "name": "n" * 65}, "at most 64 characters"),
        ({key: value for key, value in EXACT.items() if key != "name"}, "name"),
        ({**EXACT, "type": "python"}, "does not match any of the expected tags"),
        ({"type": "reward_model", "name": "rm"}, "model"),
    ],
)
def test_bad_graders_are_refused(data: dict[str, Any], problem: str) -> None:
    assert problem in error_of(data)


def test_input_defaults_to_the_completion() -> None:
    grader = parse(EXACT)
    assert isinstance(grader, StringCheckGrader)
    assert grader.input == "{{sample.output_text}}"
    regex = parse({"type": "regex", "name": "r", "pattern": "x"})
    assert isinstance(regex, RegexGrader)
    assert regex.input == "{{sample.output_text}}"


def test_batches_must_pair_items_and_outputs() -> None:
    with pytest.raises(ValueError, match="2 items but 1 outputs"):
        grade(parse(EXACT), [{}, {}], ["x"])
