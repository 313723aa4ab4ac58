"""Scoring a batch of completions with a grader (GRPO scores a whole group at once).

Scoring never raises on data: a row missing a field a template reads, a completion that is not
JSON, a pattern that runs past its time limit, a formula that divides by zero or a non-finite
score all give 0.0. It raises only on misuse: batches of different lengths, a reward_model grader
without a scorer, a scorer that answers the wrong number of scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app.graders.formula import evaluate, parse_formula
from app.graders.metrics import similarity
from app.graders.schemas import (
    Grader,
    JsonEqualGrader,
    JsonSchemaGrader,
    MultiGrader,
    RegexGrader,
    RewardModelGrader,
    StringCheckGrader,
    StringCheckOperation,
    TextSimilarityGrader,
    compile_pattern,
)
from app.graders.templates import (
    MISSING,
    MissingItemField,
    Sample,
    parse_json,
    render,
    render_value,
)

# How long one regex search may run. A pattern with catastrophic backtracking (e.g. (a|aa)+$)
# could otherwise hold a training worker for hours on one completion.
REGEX_TIMEOUT_S = 0.2

# (model, rendered inputs, their rows) -> one score per input. Called once per batch per
# reward_model grader; rows whose input could not be rendered are left out and score 0.0.
RewardModelScorer = Callable[[str, list[str], list[dict[str, Any]]], Sequence[float]]


@dataclass
class _Batch:
    items: Sequence[dict[str, Any]]
    samples: list[Sample]
    reward_model_scorer: RewardModelScorer | None

    def rows(self) -> zip[tuple[dict[str, Any], Sample]]:
        return zip(self.items, self.samples, strict=True)


def grade(
    grader: Grader,
    items: Sequence[dict[str, Any]],
    outputs: Sequence[str],
    reward_model_scorer: RewardModelScorer | None = None,
) -> list[float]:
    """One score per (item, output) pair: the dataset row and the completion for it."""
    totals, _ = _grade(grader, _batch(items, outputs, reward_model_scorer))
    return totals


def grade_detailed(
    grader: Grader,
    items: Sequence[dict[str, Any]],
    outputs: Sequence[str],
    reward_model_scorer: RewardModelScorer | None = None,
) -> list[dict[str, float]]:
    """Per pair, the grader's name -> its score and, for a multi grader, "<name>.<key>" -> the
    score of each of its graders (e.g. {"total": 0.8, "total.exact": 1.0, "total.fuzzy": 0.6})."""
    totals, parts = _grade(grader, _batch(items, outputs, reward_model_scorer))
    details = [{grader.name: total} for total in totals]
    for key, scores in parts.items():
        for detail, score in zip(details, scores, strict=True):
            detail[f"{grader.name}.{key}"] = score
    return details


def _batch(
    items: Sequence[dict[str, Any]],
    outputs: Sequence[str],
    reward_model_scorer: RewardModelScorer | None,
) -> _Batch:
    if len(items) != len(outputs):
        raise ValueError(f"{len(items)} items but {len(outputs)} outputs")
    return _Batch(items, [Sample(output) for output in outputs], reward_model_scorer)


def _grade(grader: Grader, batch: _Batch) -> tuple[list[float], dict[str, list[float]]]:
    if not isinstance(grader, MultiGrader):
        return _scores(grader, batch), {}
    parts = {key: _scores(sub_grader, batch) for key, sub_grader in grader.graders.items()}
    formula = parse_formula(grader.calculate_output, frozenset(grader.graders))
    totals = []
    for row in range(len(batch.samples)):
        try:
            total = evaluate(formula, {key: scores[row] for key, scores in parts.items()})
        except ZeroDivisionError:
            total = 0.0
        totals.append(_finite(total))
    return totals, parts


def _scores(grader: Grader, batch: _Batch) -> list[float]:
    if isinstance(grader, MultiGrader):  # not reached (schemas forbid nesting); narrows the type
        return _grade(grader, batch)[0]
    if isinstance(grader, RewardModelGrader):
        return _reward_model(grader, batch)
    score_row = _row_scorer(grader)
    scores = []
    for item, sample in batch.rows():
        try:
            scores.append(score_row(item, sample))
        except MissingItemField:
            scores.append(0.0)
    return scores


RowScorer = Callable[[Mapping[str, Any], Sample], float]


def _row_scorer(
    grader: StringCheckGrader
    | TextSimilarityGrader
    | RegexGrader
    | JsonSchemaGrader
    | JsonEqualGrader,
) -> RowScorer:
    """The per-row function of a grader, with what it needs built once for the batch."""
    match grader:
        case StringCheckGrader():
            return lambda item, sample: _string_check(
                grader.operation,
                render(grader.input, item, sample),
                render(grader.reference, item, sample),
            )
        case TextSimilarityGrader():
            return lambda item, sample: _threshold(
                similarity(
                    grader.evaluation_metric,
                    render(grader.input, item, sample),
                    render(grader.reference, item, sample),
                ),
                grader.pass_threshold,
            )
        case RegexGrader():
            pattern = compile_pattern(grader.pattern, ignore_case=grader.ignore_case)
            return lambda item, sample: _search(pattern, render(grader.input, item, sample))
        case JsonSchemaGrader():
            validator = _validator(grader.json_schema)
            return lambda item, sample: _conforms(
                validator, parse_json(render(grader.input, item, sample))
            )
        case JsonEqualGrader():
            return lambda item, sample: _score(
                _json_equal(
                    render_value(grader.input, item, sample),
                    render_value(grader.reference, item, sample),
                )
            )


def _score(passed: bool) -> float:
    return 1.0 if passed else 0.0


def _finite(score: float) -> float:
    return score if math.isfinite(score) else 0.0


def _string_check(operation: StringCheckOperation, text: str, reference: str) -> float:
    match operation:
        case StringCheckOperation.EQ:
            return _score(text == reference)
        case StringCheckOperation.NE:
            return _score(text != reference)
        case StringCheckOperation.LIKE:
            return _score(reference in text)
        case StringCheckOperation.ILIKE:
            return _score(reference.casefold() in text.casefold())


def _threshold(metric: float, pass_threshold: float | None) -> float:
    return metric if pass_threshold is None else _score(metric >= pass_threshold)


def _search(pattern: Any, text: str) -> float:
    try:
        return _score(pattern.search(text, timeout=REGEX_TIMEOUT_S) is not None)
    except TimeoutError:
        return 0.0


def _validator(schema: dict[str, Any]) -> Any:
    import jsonschema

    return jsonschema.validators.validator_for(schema)(schema)


def _conforms(validator: Any, instance: Any) -> float:
    if instance is MISSING:
        return 0.0
    try:
        return _score(bool(validator.is_valid(instance)))
    except Exception:  # e.g. an unresolvable $ref: the schema cannot accept this input
        return 0.0


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality: key order ignored and 1 == 1.0 as in JSON, but true is not 1 (as it is in
    Python) and a missing value equals nothing."""
    if a is MISSING or b is MISSING:
        return False
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[key], b[key]) for key in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def _reward_model(grader: RewardModelGrader, batch: _Batch) -> list[float]:
    if batch.reward_model_scorer is None:
        raise ValueError(
            f"grader {grader.name!r} scores with the reward model {grader.model!r}: "
            "pass reward_model_scorer"
        )
    scores = [0.0] * len(batch.samples)
    rows, inputs = [], []
    for row, (item, sample) in enumerate(batch.rows()):
        try:
            inputs.append(render(grader.input, item, sample))
        except MissingItemField:
            continue
        rows.append(row)
    if not rows:
        return scores
    answered = batch.reward_model_scorer(grader.model, inputs, [batch.items[row] for row in rows])
    if len(answered) != len(rows):
        raise ValueError(
            f"the reward model scorer answered {len(answered)} scores for {len(rows)} inputs"
        )
    for row, score in zip(rows, answered, strict=True):
        scores[row] = _finite(float(score))
    return scores
