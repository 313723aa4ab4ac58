"""Graders for reinforcement fine-tuning: score a completion for one dataset row with a float.

Validate a grader with `grader_adapter.validate_python(...)` (or use `Grader` as a request field),
check dataset rows with `check_row`, and score batches with `grade`.
"""

from app.graders.inputs import check_row, item_fields, reward_model_names
from app.graders.schemas import (
    Grader,
    JsonEqualGrader,
    JsonSchemaGrader,
    MultiGrader,
    RegexGrader,
    RewardModelGrader,
    SimilarityMetric,
    StringCheckGrader,
    StringCheckOperation,
    SubGrader,
    TextSimilarityGrader,
    grader_adapter,
)
from app.graders.scoring import RewardModelScorer, grade, grade_detailed

__all__ = [
    "Grader",
    "JsonEqualGrader",
    "JsonSchemaGrader",
    "MultiGrader",
    "RegexGrader",
    "RewardModelGrader",
    "RewardModelScorer",
    "SimilarityMetric",
    "StringCheckGrader",
    "StringCheckOperation",
    "SubGrader",
    "TextSimilarityGrader",
    "check_row",
    "grade",
    "grade_detailed",
    "grader_adapter",
    "item_fields",
    "reward_model_names",
]
