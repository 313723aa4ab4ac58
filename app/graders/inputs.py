"""What a grader reads: the dataset row fields its templates need and the reward models it
scores with, so a dataset is checked and reward models resolved before training starts."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from app.graders.schemas import (
    Grader,
    JsonEqualGrader,
    MultiGrader,
    RewardModelGrader,
    StringCheckGrader,
    TextSimilarityGrader,
)
from app.graders.templates import MISSING, placeholders, resolve


def graders_in(grader: Grader) -> Iterator[Grader]:
    """The grader and, for a multi grader, each of its graders."""
    yield grader
    if isinstance(grader, MultiGrader):
        for sub_grader in grader.graders.values():
            yield from graders_in(sub_grader)


def templates_of(grader: Grader) -> list[str]:
    """The grader's own templates (not its sub-graders'); a regex pattern is not a template."""
    if isinstance(grader, MultiGrader):
        return []
    if isinstance(grader, StringCheckGrader | TextSimilarityGrader | JsonEqualGrader):
        return [grader.input, grader.reference]
    return [grader.input]


def item_fields(grader: Grader) -> set[str]:
    """The top-level row fields that the grader's templates read (all of its graders')."""
    return {
        placeholder.path[0]
        for each in graders_in(grader)
        for template in templates_of(each)
        for placeholder in placeholders(template)
        if placeholder.namespace == "item"
    }


def check_row(grader: Grader, row: Any) -> list[tuple[str, str]]:
    """The problems of one dataset row for this grader, as (top-level field, message), e.g.
    ("answer", "missing: grader 'exact' reads {{item.answer}}"); empty when it has none."""
    if not isinstance(row, Mapping):
        return [("", f"the row is a JSON {type(row).__name__}, not an object")]
    problems: list[tuple[str, str]] = []
    for each in graders_in(grader):
        for template in templates_of(each):
            for placeholder in placeholders(template):
                if placeholder.namespace != "item" or resolve(row, placeholder.path) is not MISSING:
                    continue
                problem = (
                    placeholder.path[0],
                    f"missing: grader {each.name!r} reads {placeholder.canonical}",
                )
                if problem not in problems:
                    problems.append(problem)
    return problems


def reward_model_names(grader: Grader) -> list[str]:
    """The `model` of every reward_model grader inside, each once, in order."""
    names: list[str] = []
    for each in graders_in(grader):
        if isinstance(each, RewardModelGrader) and each.model not in names:
            names.append(each.model)
    return names
