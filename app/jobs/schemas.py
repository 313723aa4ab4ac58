"""Request and response models of the jobs API."""

from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    StrictInt,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from app.graders import Grader
from app.jobs.auto import AUTO
from app.jobs.models import JobStatus
from app.schemas import RequestModel, ResponseModel, absent_if_none

MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,99}$")
SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


class LrScheduler(enum.StrEnum):
    LINEAR = "linear"
    COSINE = "cosine"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"


class AcceleratorClass(enum.StrEnum):
    ROCM = "rocm"
    CUDA = "cuda"
    CPU = "cpu"


def auto_or(number: Any) -> WrapValidator:
    """Accept "auto" or a value of `number` (an annotated type with its bounds); errors name the
    field alone, not a branch of a union."""
    adapter: TypeAdapter[Any] = TypeAdapter(number)

    def validate(value: Any, _handler: ValidatorFunctionWrapHandler) -> Any:
        if value == AUTO:
            return AUTO
        try:
            return adapter.validate_python(value)
        except ValidationError as exc:
            error = exc.errors()[0]
            raise PydanticCustomError(
                error["type"], error["msg"] + ' (or "auto")', error.get("ctx")
            ) from None

    return WrapValidator(validate, json_schema_input_type=Literal["auto"] | number)


AutoEpochs = Annotated[
    StrictInt | Literal["auto"], auto_or(Annotated[StrictInt, Field(ge=1, le=100)])
]
AutoLearningRate = Annotated[float | Literal["auto"], auto_or(Annotated[float, Field(gt=0, le=1)])]
AutoBatchSize = Annotated[
    StrictInt | Literal["auto"], auto_or(Annotated[StrictInt, Field(ge=1, le=1024)])
]


class Hyperparameters(RequestModel):
    n_epochs: AutoEpochs = Field(
        AUTO,
        description='Passes over the training set; "auto" (default): from the dataset size.',
    )
    learning_rate: AutoLearningRate = Field(
        AUTO,
        description='Peak learning rate (AdamW); "auto" (default): from the batch and model.',
    )
    batch_size: AutoBatchSize = Field(
        AUTO,
        description='Examples per device step; "auto" (default): from the dataset size and the '
        "device's memory.",
    )
    gradient_accumulation_steps: StrictInt = Field(
        1, ge=1, le=1024, description="Steps accumulated per optimizer update."
    )
    max_seq_length: StrictInt = Field(
        1024, ge=16, le=131072, description="Tokens per example after the chat template."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    lr_scheduler: LrScheduler = Field(LrScheduler.LINEAR, description="Learning-rate schedule.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    seed: StrictInt = Field(
        42, ge=0, le=2**32 - 1, description="Seed for data order and LoRA init."
    )
    checkpoint_every_steps: StrictInt | None = Field(
        None, ge=1, le=1_000_000, description="Checkpoint every N steps (server default if null)."
    )
    checkpoint_every_minutes: float | None = Field(
        None, gt=0, le=1440, description="Also checkpoint when this many minutes have passed."
    )
    checkpoints_kept: StrictInt | None = Field(
        None, ge=1, le=50, description="How many of the newest checkpoints to keep."
    )
    eval_every_steps: StrictInt | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Eval loss on validation_url every N steps (default: each epoch).",
    )


class TrainingHyperparameters(Hyperparameters):
    """The hyperparameters a run trains with: those of the job, every "auto" resolved to its
    number by the worker (app/jobs/auto.py)."""

    model_config = ConfigDict(frozen=True)

    n_epochs: StrictInt = Field(ge=1, le=100, description="Passes over the training set.")
    learning_rate: float = Field(gt=0, le=1, description="Peak learning rate (AdamW).")
    batch_size: StrictInt = Field(ge=1, le=1024, description="Examples per device step.")


class LoraType(enum.StrEnum):
    LORA = "lora"
    ADALORA = "adalora"  # PEFT's AdaLoRA: ranks pruned per module to a budget while training


class LoraSpec(RequestModel):
    type: LoraType = Field(
        LoraType.LORA,
        description='"lora", or "adalora": AdaLoRA starts every module at rank r and, while '
        "training, prunes the least important singular values until the modules keep "
        "target_r on average; the adapter is published as the plain LoRA it equals.",
    )
    r: StrictInt = Field(16, ge=1, le=256, description="LoRA rank (AdaLoRA: the initial rank).")
    alpha: StrictInt = Field(32, ge=1, le=1024, description="LoRA scaling numerator (alpha / r).")
    dropout: float = Field(0.05, ge=0, le=0.9, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description='"all-linear" or module names such as ["q_proj", "v_proj"].'
    )
    use_rslora: bool = Field(
        False,
        description="Rank-stabilized LoRA: scale the update by alpha / sqrt(r) instead of "
        "alpha / r, so higher ranks keep learning (rsLoRA).",
    )
    use_dora: bool = Field(
        False,
        description="Weight-decomposed LoRA (DoRA): a trained magnitude per output feature on "
        "top of the LoRA direction update. Not with quantization 8bit.",
    )
    target_r: StrictInt | None = Field(
        None,
        ge=1,
        le=256,
        description="AdaLoRA: the average rank the modules keep (at most r; default r / 2). "
        "Only with type adalora.",
    )

    @model_validator(mode="after")
    def _adalora_settings(self) -> LoraSpec:
        if self.type is LoraType.ADALORA:
            for flag in ("use_dora", "use_rslora"):
                if getattr(self, flag):
                    raise ValueError(f"{flag} does not go with type adalora (PEFT's AdaLoRA)")
            if self.target_r is not None and self.target_r > self.r:
                raise ValueError(
                    f"target_r ({self.target_r}) is the average rank AdaLoRA keeps: at most r "
                    f"({self.r})"
                )
        elif self.target_r is not None:
            raise ValueError('target_r goes with type "adalora"')
        return self

    @property
    def kept_rank(self) -> int:
        """AdaLoRA's average kept rank (target_r, default r / 2)."""
        return self.target_r or max(self.r // 2, 1)

    @field_validator("target_modules")
    @classmethod
    def _module_names(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            if not value or len(value) > 64:
                raise ValueError("give between 1 and 64 module names, or 'all-linear'")
            bad = [name for name in value if not MODULE_NAME.match(name)]
            if bad:
                raise ValueError(f"not module names: {bad}")
        return value


class Quantization(enum.StrEnum):
    """How the frozen base model's linear layers are held in training (bitsandbytes)."""

    NF4 = "4bit"  # QLoRA: NF4 with double quantization
    INT8 = "8bit"


class Distributed(enum.StrEnum):
    """How a job trains on the devices of a node (torchrun, one rank per device)."""

    DDP = "ddp"  # data-parallel: every rank holds the whole model
    FSDP = "fsdp"  # fully sharded: every rank holds a share of the weights


class MethodType(enum.StrEnum):
    SUPERVISED = "supervised"
    DPO = "dpo"
    ORPO = "orpo"
    REWARD_MODEL = "reward_model"
    REINFORCEMENT = "reinforcement"


# The methods that learn from preference rows (a prompt with a chosen and a rejected answer).
PREFERENCE_METHODS = frozenset({MethodType.DPO, MethodType.ORPO, MethodType.REWARD_MODEL})


class DpoSettings(RequestModel):
    beta: float = Field(
        0.1,
        gt=0,
        le=10,
        description="How far the adapter may move from the reference (the base model, or the "
        "adapter it starts from): lower lets it drift more toward the preferred answers.",
    )
    rpo_alpha: float | None = Field(
        None,
        ge=0,
        le=10,
        description="Weight of a supervised loss on the chosen answers added to the preference "
        "loss (RPO): keeps the adapter fluent while it moves toward them. 1 is a common choice; "
        "null or 0: plain DPO.",
    )


class OrpoSettings(RequestModel):
    beta: float = Field(
        0.1,
        gt=0,
        le=10,
        description="Weight of the odds-ratio preference term beside the supervised loss on the "
        "chosen answers (ORPO's lambda).",
    )


class ReinforcementSettings(RequestModel):
    """GRPO: for each prompt the adapter writes `num_generations` answers, the grader scores
    them, and the adapter moves toward the answers that scored above their group's mean."""

    grader: Grader = Field(
        description="What scores an answer (string_check, text_similarity, regex, json_schema, "
        "json_equal, multi or reward_model); its templates read the row's fields as "
        "{{item.<field>}} and the answer as {{sample.output_text}}."
    )
    num_generations: StrictInt = Field(
        4,
        ge=2,
        le=64,
        description="Answers written per prompt and compared with each other (GRPO's group). "
        "Each step trains on batch_size prompts times this many answers.",
    )
    max_completion_length: StrictInt = Field(
        256, ge=1, le=32768, description="The longest answer written, in tokens."
    )
    temperature: float = Field(
        1.0, gt=0, le=2, description="Sampling temperature of the answers written in training."
    )
    beta: float = Field(
        0.0,
        ge=0,
        le=10,
        description="Weight of a KL penalty toward the reference model (the base model or the "
        "adapter started from). 0 (default, as in TRL and recent GRPO practice) keeps no "
        "reference and lets the reward alone steer.",
    )


class Method(RequestModel):
    """How the adapter learns: `supervised` (SFT on the answers), `dpo` (Direct Preference
    Optimization against a reference), `orpo` (Odds Ratio Preference Optimization: SFT and
    preference in one loss, no reference model), `reward_model` (a sequence-classification
    LoRA that scores answers, trained so the chosen one scores higher), all three on rows with
    a chosen and a rejected answer; or `reinforcement` (GRPO: the adapter writes answers to
    prompt-only rows and learns from a grader's scores)."""

    type: MethodType = Field(
        MethodType.SUPERVISED,
        description="supervised, dpo, orpo, reward_model or reinforcement.",
    )
    dpo: DpoSettings | None = Field(None, description="Settings of method dpo.")
    orpo: OrpoSettings | None = Field(None, description="Settings of method orpo.")
    reinforcement: ReinforcementSettings | None = Field(
        None, description="Settings of method reinforcement; its grader is required."
    )

    @model_validator(mode="after")
    def _settings_of_its_type(self) -> Method:
        for kind in (MethodType.DPO, MethodType.ORPO, MethodType.REINFORCEMENT):
            if getattr(self, kind.value) is not None and self.type is not kind:
                raise ValueError(f"{kind.value} settings go with type {kind.value}")
        if self.type is MethodType.DPO and self.dpo is None:
            self.dpo = DpoSettings()
        if self.type is MethodType.ORPO and self.orpo is None:
            self.orpo = OrpoSettings()
        if self.type is MethodType.REINFORCEMENT and self.reinforcement is None:
            raise ValueError(
                "method reinforcement needs its settings with a grader, e.g. "
                '{"type": "reinforcement", "reinforcement": {"grader": {"type": "string_check", '
                '"name": "exact", "input": "{{sample.output_text}}", "reference": '
                '"{{item.answer}}", "operation": "eq"}}}'
            )
        return self

    @property
    def learns_preferences(self) -> bool:
        return self.type in PREFERENCE_METHODS

    @property
    def sequences_per_row(self) -> int:
        """Sequences a row becomes in a training batch: the chosen and the rejected answer of a
        preference row, the answers written to a reinforcement prompt."""
        if self.reinforcement is not None:
            return self.reinforcement.num_generations
        return 2 if self.learns_preferences else 1

    @property
    def answer_tokens(self) -> int:
        """Tokens the model writes to a row in training (reinforcement), beyond the row's own."""
        return self.reinforcement.max_completion_length if self.reinforcement else 0


class CreateJobRequest(RequestModel):
    base_model: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="A name from GET /models; default model when omitted.",
    )
    dataset_url: str = Field(
        ...,
        min_length=1,
        max_length=4096,
        description="An uploaded file id (file-…), an http(s):// URL, or a file:// path under "
        "an allowed directory.",
    )
    validation_url: str | None = Field(None, min_length=1, max_length=4096)
    adapter: str | None = Field(
        None,
        min_length=1,
        max_length=300,
        description="Train on from this adapter instead of a fresh LoRA: a finished job's id, "
        "an adapter id or name (ft:…), a checkpoint id or name (ft:…:ckpt-step-N), or an "
        "imported adapter. It must be yours and of the same base model (base_model may be left "
        "out); its LoRA settings are kept, so lora is left out.",
    )
    suffix: str | None = Field(
        None, description="Up to 40 letters, digits, '-' or '_', added to the adapter name."
    )
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    method: Method = Field(default_factory=Method)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    quantization: Quantization | None = Field(
        None,
        description='Train on a quantized frozen base model: "4bit" (QLoRA: NF4 with double '
        'quantization, about 0.5 byte per weight of its linear layers) or "8bit" (1 byte); '
        "null: as loaded (fp32). The adapter is a plain LoRA and serves on the unquantized "
        "base model.",
    )
    distributed: Distributed | None = Field(
        None,
        description='How the job spreads over the devices of a node: "ddp" (every device holds '
        'the whole model), "fsdp" (each device holds a share of the base model\'s weights: '
        "for base models that do not fit one device); null: the plan picks fsdp when the job "
        "fits only sharded, else ddp.",
    )
    metadata: dict[str, str] | None = Field(None, description="Up to 16 short key/value pairs.")
    accelerator: AcceleratorClass | None = Field(
        None,
        description="Run only on workers of this class (queue training-<class>); any worker "
        "when omitted.",
    )
    webhook_url: str | None = Field(
        None,
        min_length=1,
        max_length=2048,
        description="An http(s) URL POSTed a signed JSON event when the job ends (succeeded, "
        "failed or cancelled); retried with backoff until it answers 2xx.",
    )
    webhook_secret: str | None = Field(
        None,
        min_length=16,
        max_length=128,
        pattern=r"^[\x21-\x7e]+$",
        description="The secret webhook requests are signed with (16 to 128 printable ASCII "
        "characters); one is made and returned once, in this request's answer, when omitted.",
    )
    dry_run: bool = Field(
        False,
        description="Answer 200 with the job's plan (as POST /jobs/plan) instead of creating "
        "it: nothing is stored or queued.",
    )

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value is not None and not SUFFIX.match(value):
            raise ValueError("use 1 to 40 letters, digits, '-' or '_'")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if value is not None and not value.lower().startswith(("http://", "https://")):
            raise ValueError("use an http:// or https:// URL")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > 16:
            raise ValueError("at most 16 pairs")
        for key, item in value.items():
            if not 1 <= len(key) <= 64:
                raise ValueError(f"key {key[:70]!r}: keys are 1 to 64 characters")
            if len(item) > 512:
                raise ValueError(f"value of {key!r}: values are at most 512 characters")
        return value


class Progress(ResponseModel):
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    trained_tokens: int | None = None
    reward_mean: float | None = absent_if_none(
        "Reinforcement: the grader's mean reward of the last step's answers."
    )
    reward_std: float | None = absent_if_none("Their standard deviation.")


class JobError(ResponseModel):
    code: str
    message: str
    detail: Any = None


class AdapterRef(ResponseModel):
    id: str
    name: str


class EvaluationSample(ResponseModel):
    prompt: str = Field(description="What both models were given, as the user wrote it.")
    reference: str | None = Field(description="The dataset's answer.")
    base: str = Field(description="The base model's greedy answer.")
    adapter: str = Field(description="The fine-tuned model's greedy answer.")


class Evaluation(ResponseModel):
    split: Literal["validation", "held_out", "training_rows"] = Field(
        description="validation: the job's validation set; held_out: rows kept out of training; "
        "training_rows: the dataset was too small to hold rows out, so these were trained on."
    )
    rows: int
    base_eval_loss: float | None = absent_if_none(
        "Mean loss of the base model on the trained tokens (every method but reinforcement, "
        "whose rows have no answer to score)."
    )
    adapter_eval_loss: float | None = absent_if_none("The same loss for the fine-tuned model.")
    improvement: float | None = absent_if_none("(base - adapter) / base: 0.25 is 25% lower loss.")
    base_mean_reward: float | None = absent_if_none(
        "Reinforcement: the grader's mean reward of the base model's greedy answers."
    )
    adapter_mean_reward: float | None = absent_if_none(
        "The same mean reward for the fine-tuned model's answers."
    )
    base_preference_accuracy: float | None = absent_if_none(
        description="Preference rows (method dpo): the share whose chosen answer the base model "
        "finds likelier than the rejected one; the losses are then on the chosen answers.",
    )
    adapter_preference_accuracy: float | None = absent_if_none(
        "The same share for the fine-tuned model."
    )
    base_side_reused: bool = Field(
        default=False,
        description="The base model's loss, answers and preference accuracy are those an earlier "
        "evaluation of the same rows on the same base model computed (the worker keeps them: "
        "only the adapter's side is computed again).",
    )
    samples: list[EvaluationSample]
    seconds: float


class WebhookDeliveryView(ResponseModel):
    id: str
    event: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None


class WebhookView(ResponseModel):
    url: str
    secret: str | None = Field(
        None, description="Only in the answer to the request that created the job."
    )
    deliveries: list[WebhookDeliveryView] = Field(default_factory=list)


class JobView(ResponseModel):
    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    base_model: str
    dataset_url: str
    validation_url: str | None
    suffix: str | None
    hyperparameters: dict[str, Any] = Field(
        description='Every hyperparameter; those asked as "auto" read "auto" until the worker '
        "has validated the dataset, then the numbers it chose."
    )
    auto_hyperparameters: list[str] = Field(
        default_factory=list, description='The hyperparameters that were asked as "auto".'
    )
    lora: dict[str, Any]
    quantization: Quantization | None = Field(
        None, description='The base model\'s weights in training: "4bit", "8bit" or null.'
    )
    distributed: Distributed | None = Field(
        None, description='"ddp", "fsdp", or null (the plan picks).'
    )
    method: dict[str, Any] = Field(
        description="How the adapter learns: supervised, or dpo with its beta."
    )
    parent: dict[str, Any] | None = Field(
        None,
        description="The adapter or checkpoint the job trains on from (reference as given, "
        "kind, id); null for a fresh LoRA.",
    )
    progress: Progress | None
    dataset: dict[str, Any] | None = Field(
        None, description="Facts found while validating: rows, format, tokens, sha256, …"
    )
    adapter: AdapterRef | None = None
    evaluation: Evaluation | None = Field(
        None,
        description="After success: eval loss of the base model and of the adapter on held-out "
        "rows, and sample answers of both.",
    )
    webhook: WebhookView | None = None
    error: JobError | None
    metadata: dict[str, str] | None
    attempt: int
    queue: str
    worker: str | None
    device: dict[str, Any] | None = Field(
        None, description="The device the worker trained on (kind, name, count, bf16, memory)."
    )
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[JobView]
    has_more: bool


class JobEventView(ResponseModel):
    seq: int
    type: str
    level: str
    message: str
    data: dict[str, Any] | None
    created_at: datetime


class JobEventList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[JobEventView]
    has_more: bool


class MetricPoint(ResponseModel):
    step: int
    epoch: float | None
    train_loss: float | None
    eval_loss: float | None
    lr: float | None
    tokens_per_second: float | None
    reward_mean: float | None = absent_if_none(
        "Reinforcement: the grader's mean reward of the step's answers."
    )
    reward_std: float | None = absent_if_none("Their standard deviation.")
    created_at: datetime


class MetricList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[MetricPoint]


class CheckpointView(ResponseModel):
    id: str = Field(description="Usable as `adapter` in POST /generate.")
    object: Literal["checkpoint"] = "checkpoint"
    job_id: str
    step: int
    epoch: float | None
    metrics: dict[str, Any] | None
    created_at: datetime


class CheckpointList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointView]


# --- the pre-flight plan (POST /jobs/plan, POST /jobs with dry_run) ---------------------------


class TooLongRow(ResponseModel):
    line: int
    tokens: int


class PlanDataset(ResponseModel):
    rows: int
    held_out_rows: int = Field(
        0,
        description="Rows kept out of training for the automatic evaluation (no validation "
        "set, at least 50 rows: a tenth, at most TUNESERVE_AUTO_EVAL_ROWS).",
    )
    format: str
    tokens: int = Field(description="Every row's tokens after the chat template, EOS included.")
    max_row_tokens: int
    mean_row_tokens: float
    p99_row_tokens: int = Field(description="99th percentile of row lengths in tokens.")
    too_long_count: int = Field(description="Rows longer than max_seq_length (they fail the job).")
    too_long: list[TooLongRow] = Field(description="The first 50 of them, with their lines.")
    sha256: str
    bytes: int
    filename: str
    validation: dict[str, Any] | None = None


class PlanProblem(ResponseModel):
    code: str
    message: str
    detail: Any = None


class PlanDevice(ResponseModel):
    accelerator: str = Field(description="rocm, cuda or cpu: the class of worker the job targets.")
    name: str | None
    count: int | None = Field(None, description="Devices of that worker.")
    memory_bytes: int | None = Field(
        description="GPU memory of one device, or RAM for CPU workers; null when unknown."
    )
    source: str = Field(
        description='"setting" (TUNESERVE_DEVICE_MEMORY_BYTES), "recorded" (by a worker of the '
        'class on an earlier job), "this machine" (the api\'s), or "unknown".'
    )


class PlanTime(ResponseModel):
    estimated_seconds: float | None = Field(
        description="tokens x n_epochs / tokens_per_second + overhead_seconds; null without a "
        "measurement."
    )
    reason: str | None = Field(None, description="Why there is no estimate.")
    tokens_per_second: float | None = None
    overhead_seconds: float | None = None
    measured_jobs: int = Field(
        0, description="Jobs the medians come from (the latest 5 that succeeded on this class)."
    )


class MemoryParts(ResponseModel):
    weights: int = Field(
        description="The frozen base model's weights on one device (its share under FSDP)."
    )
    gathered_layers: int = Field(
        0,
        description="FSDP only: the decoder layers a device holds whole while it computes (the "
        "current one and the prefetched next one).",
    )
    lora_and_optimizer: int = Field(
        description="LoRA weights, gradients and Adam's two moments (a device's share under FSDP)."
    )
    activations: int
    logits: int
    runtime: int


class PlanSuggestion(ResponseModel):
    message: str
    hyperparameters: dict[str, Any] | None = Field(
        description="The changes to make; null when no change of hyperparameters fits."
    )


class PlanMemory(ResponseModel):
    estimated_bytes: int
    parts: MemoryParts
    batch: int = Field(description="Rows per batch the estimate assumes.")
    seq: int = Field(description="Tokens per row the estimate assumes (the longest row).")
    device: PlanDevice
    usable_bytes: int | None = Field(description="90% of the device's memory.")
    fits: bool | None = Field(
        description="With activation checkpointing when it is on; null when the device's "
        "memory is unknown."
    )
    activation_checkpointing: bool = Field(
        False,
        description="On when the job fits only with it: activations are recomputed in the "
        "backward pass (about a third more compute) instead of kept. The worker turns it on "
        "and says so in the job's events.",
    )
    quantization: Quantization | None = Field(
        None, description="The base model's weights the estimate assumes (the job's)."
    )
    distributed: Distributed | None = Field(
        None,
        description='"fsdp": each device holds a share of the base model (the job asked for it, '
        'or fits only so: the plan then sets it); "ddp": every device holds the whole model; '
        "null: the job trains on one device.",
    )
    shards: int = Field(
        1,
        description="Devices the base model (and the LoRA weights, gradients and optimizer "
        "state) are sharded over: the estimate is of one of them. 1 unless distributed is fsdp.",
    )
    distributed_note: str | None = Field(
        None,
        description="Why the job is sharded, and how its devices were counted where that was "
        "assumed.",
    )
    suggestion: PlanSuggestion | None = None


class MaskSegment(ResponseModel):
    text: str
    trained: bool = Field(description="The loss is computed on these tokens.")
    tokens: int


class LossMaskPreview(ResponseModel):
    line: int
    tokens: int
    trained_tokens: int
    segments: list[MaskSegment] = Field(
        description="The example as rendered for training, in order: texts concatenate to it."
    )


class JobPlan(ResponseModel):
    object: Literal["job.plan"] = "job.plan"
    base_model: str
    queue: str
    dataset: PlanDataset
    hyperparameters: dict[str, Any] = Field(description='As the job will train ("auto" resolved).')
    auto_hyperparameters: list[str]
    steps: int = Field(description="Optimizer steps the job will take.")
    time: PlanTime
    memory: PlanMemory
    loss_mask_preview: list[LossMaskPreview] = Field(
        description="The first 3 examples, with the tokens trained and masked."
    )
    problems: list[PlanProblem] = Field(
        description="What would fail the job as it stands (e.g. rows_too_long)."
    )
