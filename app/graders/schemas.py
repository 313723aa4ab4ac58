"""Graders: how a completion for one dataset row is scored with a float reward.

The shapes follow OpenAI's fine-tuning graders (`string_check`, `text_similarity`, `multi`)
where OpenAI has the grader; `regex`, `json_schema`, `json_equal` and `reward_model` are ours.
No grader runs user code. Everything that can be checked without a row (templates, patterns,
schemas, formulas) is checked here, so a bad grader is a 422 at request time.
"""

from __future__ import annotations

import enum
import keyword
from typing import Annotated, Any, Literal

import regex
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationInfo,
    field_validator,
)

from app.graders.formula import FUNCTIONS, parse_formula
from app.graders.templates import parse_template
from app.schemas import RequestModel

DEFAULT_INPUT = "{{sample.output_text}}"
TEMPLATE_MAX_CHARS = 10_000
PATTERN_MAX_CHARS = 1_000
FORMULA_MAX_CHARS = 1_000
MULTI_MAX_GRADERS = 10


def _check_template(template: str) -> str:
    parse_template(template)
    return template


Template = Annotated[str, Field(max_length=TEMPLATE_MAX_CHARS), AfterValidator(_check_template)]
GraderName = Annotated[
    str, Field(min_length=1, max_length=64, description="The name of the grader.")
]

INPUT_DESCRIPTION = (
    "The text being graded, a template: {{sample.output_text}} (the default) is the completion, "
    "{{sample.output_json.<path>}} a part of it parsed as JSON, {{item.<field>}} a field of "
    "the dataset row."
)


class StringCheckOperation(enum.StrEnum):
    EQ = "eq"
    NE = "ne"
    LIKE = "like"
    ILIKE = "ilike"


class SimilarityMetric(enum.StrEnum):
    FUZZY_MATCH = "fuzzy_match"
    BLEU = "bleu"
    ROUGE_1 = "rouge_1"
    ROUGE_2 = "rouge_2"
    ROUGE_3 = "rouge_3"
    ROUGE_4 = "rouge_4"
    ROUGE_5 = "rouge_5"
    ROUGE_L = "rouge_l"


# OpenAI's metrics that need what we do not have here (an embedding model, METEOR's WordNet).
UNSUPPORTED_METRICS = ("gleu", "meteor", "cosine")


class StringCheckGrader(RequestModel):
    """1.0 when the check passes, else 0.0."""

    type: Literal["string_check"] = "string_check"
    name: GraderName
    input: Template = Field(DEFAULT_INPUT, description=INPUT_DESCRIPTION)
    reference: Template = Field(
        description="The text to compare with, a template (e.g. {{item.answer}})."
    )
    operation: StringCheckOperation = Field(
        description=(
            "eq: input equals reference; ne: they differ; like: input contains reference; "
            "ilike: input contains reference, ignoring case. Exact, case-sensitive comparisons "
            "of the rendered text (no trimming); like and ilike take the reference literally, "
            "as OpenAI does (% and _ are not wildcards: use a regex grader for patterns)."
        )
    )


class TextSimilarityGrader(RequestModel):
    """A similarity in [0, 1] between input and reference, or 1.0/0.0 against a threshold."""

    type: Literal["text_similarity"] = "text_similarity"
    name: GraderName
    input: Template = Field(DEFAULT_INPUT, description=INPUT_DESCRIPTION)
    reference: Template = Field(description="The text to compare with, a template.")
    evaluation_metric: SimilarityMetric = Field(
        description=(
            "fuzzy_match: rapidfuzz's ratio (edit distance, case-sensitive); bleu: sacrebleu's "
            "sentence BLEU; rouge_1..rouge_5, rouge_l: the ROUGE F-measure (rouge-score, "
            "lowercased words). Each scaled to [0, 1]."
        )
    )
    pass_threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description=(
            "When set, the score is 1.0 if the metric is at least this, else 0.0; "
            "when not, the score is the metric itself."
        ),
    )

    @field_validator("evaluation_metric", mode="before")
    @classmethod
    def _supported_metric(cls, value: Any) -> Any:
        if value in UNSUPPORTED_METRICS:
            supported = ", ".join(metric.value for metric in SimilarityMetric)
            raise ValueError(f"evaluation_metric {value!r} is not supported here; use {supported}")
        return value


class RegexGrader(RequestModel):
    """1.0 when the pattern matches anywhere in the input, else 0.0."""

    type: Literal["regex"] = "regex"
    name: GraderName
    input: Template = Field(DEFAULT_INPUT, description=INPUT_DESCRIPTION)
    pattern: str = Field(
        min_length=1,
        max_length=PATTERN_MAX_CHARS,
        description=(
            "A regular expression (Python syntax, the `regex` module), searched for anywhere "
            "in the input: anchor it with ^ and $ (or \\A and \\Z) to match the whole text. "
            "Not a template. A match that runs past a time limit scores 0.0."
        ),
    )
    ignore_case: bool = Field(False, description="Match without regard to case.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        compile_pattern(pattern, ignore_case=False)
        return pattern


class JsonSchemaGrader(RequestModel):
    """1.0 when the input is JSON that the schema accepts, else 0.0."""

    # The field is `json_schema` in Python (BaseModel.schema exists) and `schema` in JSON, both
    # ways: dumps use the alias without being asked.
    model_config = ConfigDict(serialize_by_alias=True)

    type: Literal["json_schema"] = "json_schema"
    name: GraderName
    input: Template = Field(DEFAULT_INPUT, description=INPUT_DESCRIPTION)
    json_schema: dict[str, Any] = Field(
        alias="schema",
        description=(
            "A JSON Schema (draft 2020-12 unless its $schema names another); $refs are "
            "resolved only inside the schema itself."
        ),
    )

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        import jsonschema

        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            where = "/".join(str(part) for part in exc.path)
            raise ValueError(
                f"not a valid JSON Schema: {exc.message}" + (f" (at {where})" if where else "")
            ) from None
        return schema


class JsonEqualGrader(RequestModel):
    """1.0 when input and reference are equal JSON values, else 0.0."""

    type: Literal["json_equal"] = "json_equal"
    name: GraderName
    input: Template = Field(DEFAULT_INPUT, description=INPUT_DESCRIPTION)
    reference: Template = Field(
        description=(
            "The expected JSON, a template. A template that is exactly one placeholder whose "
            "value is not a string (e.g. {{item.expected}} holding an object) is compared as "
            "that value; otherwise the rendered text is parsed as JSON. Key order does not "
            "matter, 1 equals 1.0, true does not equal 1."
        )
    )


class RewardModelGrader(RequestModel):
    """The score of a trained reward model (a `reward_model` job of this service)."""

    type: Literal["reward_model"] = "reward_model"
    name: GraderName
    model: str = Field(
        min_length=1,
        max_length=256,
        description="The reward model: a job id, adapter id or ft: name of a reward_model job.",
    )
    input: Template = Field(DEFAULT_INPUT, description=INPUT_DESCRIPTION)


SubGrader = Annotated[
    StringCheckGrader
    | TextSimilarityGrader
    | RegexGrader
    | JsonSchemaGrader
    | JsonEqualGrader
    | RewardModelGrader,
    Field(discriminator="type"),
]


class MultiGrader(RequestModel):
    """Several graders combined by an arithmetic formula over their scores."""

    type: Literal["multi"] = "multi"
    name: GraderName
    graders: dict[str, SubGrader] = Field(
        min_length=1,
        max_length=MULTI_MAX_GRADERS,
        description=(
            "The graders, by the names the formula uses (identifiers, e.g. `exact`). "
            "A multi grader cannot contain another multi grader."
        ),
    )
    calculate_output: str = Field(
        min_length=1,
        max_length=FORMULA_MAX_CHARS,
        description=(
            "The score as a formula over the graders' names, e.g. `0.5 * exact + 0.5 * fuzzy`: "
            "numbers, + - * /, parentheses, min(), max() and abs(). A division by zero "
            "scores 0.0."
        ),
    )

    @field_validator("graders", mode="before")
    @classmethod
    def _no_nesting(cls, graders: Any) -> Any:
        if isinstance(graders, dict):
            for key, grader in graders.items():
                nested = isinstance(grader, dict) and grader.get("type") == "multi"
                if nested or isinstance(grader, MultiGrader):
                    raise ValueError(
                        f"grader {key!r}: a multi grader cannot contain another multi grader; "
                        "write one formula over all the graders instead"
                    )
        return graders

    @field_validator("graders")
    @classmethod
    def _formula_names(cls, graders: dict[str, SubGrader]) -> dict[str, SubGrader]:
        for key in graders:
            if not key.isidentifier() or keyword.iskeyword(key) or len(key) > 64:
                raise ValueError(
                    f"grader name {key!r} cannot be used in a formula: use letters, digits and "
                    "_ (not starting with a digit), at most 64 characters"
                )
            if key in FUNCTIONS:
                raise ValueError(f"grader name {key!r} is a formula function; choose another")
        return graders

    @field_validator("calculate_output")
    @classmethod
    def _valid_formula(cls, formula: str, info: ValidationInfo) -> str:
        if "graders" in info.data:  # else the graders' own errors are reported
            parse_formula(formula, frozenset(info.data["graders"]))
        return formula


Grader = Annotated[
    StringCheckGrader
    | TextSimilarityGrader
    | RegexGrader
    | JsonSchemaGrader
    | JsonEqualGrader
    | RewardModelGrader
    | MultiGrader,
    Field(discriminator="type"),
]

# grader_adapter.validate_python(data) / .validate_json(text) -> Grader;
# grader_adapter.dump_python(grader, mode="json") / .dump_json(grader) -> the same JSON back.
grader_adapter: TypeAdapter[Grader] = TypeAdapter(Grader)


def compile_pattern(pattern: str, *, ignore_case: bool) -> Any:
    """The compiled pattern (cached by the `regex` module); a ValueError naming the problem."""
    try:
        return regex.compile(pattern, regex.IGNORECASE if ignore_case else 0)
    except regex.error as exc:
        raise ValueError(f"pattern does not compile: {exc}") from None
