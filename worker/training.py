"""The LoRA training pipeline: a plain function of (spec, records, output dir).

It knows nothing of SQL or Celery; the job's train stage (worker/stages.py) wraps it. It reads
top to bottom: load model -> build datasets -> trainer -> train -> save.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from app.adapters import adalora
from app.jobs.schemas import (
    DpoSettings,
    LoraSpec,
    LoraType,
    Method,
    MethodType,
    TrainingHyperparameters,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingSpec:
    """What to train: the base model on disk, typed hyperparameters ("auto" resolved) and LoRA
    settings, and how often to checkpoint."""

    model_location: str
    hyperparameters: TrainingHyperparameters
    lora: LoraSpec
    method: Method = field(default_factory=Method)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    bf16: bool = False
    gradient_checkpointing: bool = False
    quantization: str | None = None  # "4bit" (QLoRA's NF4) or "8bit": the frozen base's weights
    # "fsdp": the ranks of a distributed run each hold a share of the model (FSDP2); else DDP.
    distributed: str | None = None
    # Supervised rows laid end to end, without padding (False: padded batches, for comparison).
    padding_free: bool = True
    # The LM head projects only the positions whose next token is learned (False: every
    # position, as TRL does on devices without Triton; for comparison).
    trained_positions_only: bool = True
    checkpoint_every_steps: int = 50
    checkpoint_every_minutes: float = 10.0
    checkpoints_kept: int = 3
    resume_from: str | None = None  # a local checkpoint directory to continue from
    start_from: str | None = None  # a local adapter directory to train on from (a parent)
    # Reinforcement: the adapter directory here of each reward model the grader names.
    reward_models: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            **{f.name: getattr(self, f.name) for f in fields(self)},
            "hyperparameters": self.hyperparameters.model_dump(mode="json"),
            "lora": self.lora.model_dump(mode="json"),
            "method": self.method.model_dump(mode="json"),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainingSpec:
        return cls(
            **{
                **data,
                "hyperparameters": TrainingHyperparameters.model_validate(data["hyperparameters"]),
                "lora": LoraSpec.model_validate(data["lora"]),
                "method": Method.model_validate(data["method"]),
            }
        )


@dataclass(frozen=True)
class Checkpoint:
    step: int
    epoch: float
    directory: Path  # LoRA weights + optimizer, scheduler, RNG and trainer state
    train_loss: float | None


@dataclass(frozen=True)
class ProgressUpdate:
    step: int
    total_steps: int
    epoch: float
    train_loss: float | None
    learning_rate: float | None
    tokens_per_second: float | None
    eta_seconds: float | None
    eval_loss: float | None = None
    # Reinforcement: the mean and spread of the grader's rewards of the step's answers.
    reward_mean: float | None = None
    reward_std: float | None = None


RowLosses = list[tuple[float, int]]  # (summed loss, trained tokens) of each row
EvaluateTrained = Callable[[Any, Any, RowLosses | None], dict[str, Any] | None]


@dataclass
class TrainingHooks:
    """How the pipeline reports to its caller and learns that it should stop."""

    on_progress: Callable[[ProgressUpdate], None] = lambda _update: None
    should_stop: Callable[[], bool] = lambda: False
    # Asked when stopping: save a checkpoint first (a worker shutting down hands the job back).
    checkpoint_before_stop: Callable[[], bool] = lambda: False
    on_checkpoint: Callable[[Checkpoint], None] = lambda _checkpoint: None
    # Given, a single-process run hands over the model it has trained, in memory, with its
    # tokenizer (the job's evaluation, worker/evaluation.py): what it returns is the result's
    # `evaluation`. The third argument: the adapter's row losses on the eval rows, when the run
    # scored them itself in place of the Trainer's last evaluation (supervised runs).
    evaluate_trained: EvaluateTrained | None = None


@dataclass(frozen=True)
class TrainingResult:
    steps: int
    total_steps: int
    stopped_early: bool
    train_loss: float | None
    eval_loss: float | None
    trained_tokens: int
    seconds: float
    # AdaLoRA: the rank each module kept (the adapter is saved as the uniform LoRA it equals).
    kept_ranks: dict[str, int] | None = None
    # Of `seconds`, those of trainer.train(): the steps (and evals between epochs).
    steps_seconds: float = 0.0
    # What hooks.evaluate_trained returned, and the seconds the evaluation took (with the eval
    # rows' losses it scored in place of the Trainer's last evaluation), of `seconds`.
    evaluation: dict[str, Any] | None = None
    evaluation_seconds: float = 0.0


def _make_callback(spec: TrainingSpec, hooks: TrainingHooks, last_eval_here: bool) -> Any:
    """The run's reporter. With last_eval_here, the Trainer does not evaluate after the last
    step: train_lora scores the eval rows itself, with the model in memory, and reports the
    loss through report_eval_loss."""
    from transformers import TrainerCallback

    class ReportingCallback(TrainerCallback):
        """Turns trainer logs into ProgressUpdates and asks the trainer to stop on cancel."""

        def __init__(self) -> None:
            self.started = time.monotonic()
            self.last_saved = time.monotonic()
            self.last_loss: float | None = None
            self.first_step = 0
            self.first_tokens = 0
            self.last_update: ProgressUpdate | None = None

        def report_eval_loss(self, loss: float) -> None:
            if self.last_update is not None:
                hooks.on_progress(
                    replace(self.last_update, train_loss=None, learning_rate=None, eval_loss=loss)
                )

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:  # noqa: ARG002
            # Time from the first step on: model loading and tokenizing are not training speed.
            # A resumed run starts at its checkpoint's step and token count.
            self.started = time.monotonic()
            self.first_step = state.global_step
            self.first_tokens = getattr(state, "num_input_tokens_seen", 0) or 0

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:  # noqa: ARG002
            if hooks.should_stop():
                control.should_training_stop = True
                control.should_save = hooks.checkpoint_before_stop()
            elif state.global_step >= state.max_steps:
                self.on_epoch_end(args, state, control)
            elif time.monotonic() - self.last_saved >= spec.checkpoint_every_minutes * 60:
                control.should_save = True

        def on_epoch_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:  # noqa: ARG002
            if last_eval_here and state.global_step >= state.max_steps:
                control.should_evaluate = False

        def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:  # noqa: ARG002
            self.last_saved = time.monotonic()
            if state.is_world_process_zero:
                directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                hooks.on_checkpoint(
                    Checkpoint(
                        step=state.global_step,
                        epoch=float(state.epoch or 0.0),
                        directory=directory,
                        train_loss=self.last_loss,
                    )
                )

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:  # noqa: ARG002
            logs = logs or {}
            if "loss" in logs:
                self.last_loss = float(logs["loss"])
            elapsed = max(time.monotonic() - self.started, 1e-9)
            step, total = state.global_step, max(state.max_steps, 1)
            tokens = (getattr(state, "num_input_tokens_seen", 0) or 0) - self.first_tokens
            done = step - self.first_step
            eta = (total - step) * elapsed / done if done > 0 else None
            self.last_update = ProgressUpdate(
                step=step,
                total_steps=total,
                epoch=float(state.epoch or 0.0),
                train_loss=self.last_loss if "loss" in logs else None,
                learning_rate=float(logs["learning_rate"]) if "learning_rate" in logs else None,
                tokens_per_second=tokens / elapsed if tokens else None,
                eta_seconds=eta,
                eval_loss=float(logs["eval_loss"]) if "eval_loss" in logs else None,
                reward_mean=float(logs["reward"]) if "reward" in logs else None,
                reward_std=float(logs["reward_std"]) if "reward_std" in logs else None,
            )
            hooks.on_progress(self.last_update)

    return ReportingCallback()


def _eval_strategy(has_eval: bool, every_steps: int | None) -> str:
    if not has_eval:
        return "no"
    return "steps" if every_steps else "epoch"


def trained_tokens(
    tokenizer: Any, records: list[dict[str, Any]], max_length: int | None = None
) -> list[dict[str, Any]]:
    """Records as token ids with the loss mask, cut to max_length: for chat, only the assistant
    messages are learned; for prompt-completion, only the completion
    (app/datasets/loss_mask.py). The fused LM head then projects only those positions
    (_lm_head_on_trained_positions): the loss costs nothing where nothing is learned. (A job's
    rows are never cut: the worker fails a job whose rows are longer than max_seq_length
    before training.)"""
    from app.datasets.loss_mask import token_mask

    examples = []
    for record in records:
        input_ids, mask = token_mask(tokenizer, record)
        examples.append(
            {
                "input_ids": input_ids[:max_length],
                "assistant_masks": [int(bit) for bit in mask][:max_length],
            }
        )
    return examples


def prompt_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Reinforcement rows as GRPOTrainer reads them: the prompt, and the row the grader reads
    as JSON text (rows differ in their fields; one text column holds any of them)."""
    return [{"prompt": r["prompt"], "item": json.dumps(r["item"])} for r in records]


def _preference_loss(dpo: DpoSettings) -> dict[str, Any]:
    """DPO's sigmoid loss, plus (RPO) the chosen answers' supervised loss at rpo_alpha."""
    if not dpo.rpo_alpha:
        return {"beta": dpo.beta}
    return {"beta": dpo.beta, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, dpo.rpo_alpha]}


def quantization_config(quantization: str | None, bf16: bool, sharded: bool = False) -> Any:
    """bitsandbytes' config for a quantized frozen base (None: as loaded). 4bit is the QLoRA
    recipe: NF4 with double quantization (the blocks' scales quantized too), computing in bf16
    where the device runs it natively, else fp32. Sharded (FSDP), the packed 4-bit weights are
    stored in the compute dtype, so FSDP shards them like every other weight (FSDP+QLoRA)."""
    if quantization is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    compute = torch.bfloat16 if bf16 else torch.float32
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        **({"bnb_4bit_quant_storage": compute} if sharded else {}),
    )


def adalora_schedule(total_steps: int) -> dict[str, Any]:
    """AdaLoRA's phases over a run (PEFT's tinit, tfinal, deltaT): the first 10% of the steps
    train at the initial rank, the budget then shrinks at most 10 times, and the last 20% train
    at the final ranks. A run too short for that prunes at every step."""
    tinit, tfinal = total_steps // 10, total_steps // 5
    budgeting = total_steps - tinit - tfinal
    if budgeting < 1:
        tinit, tfinal, budgeting = 0, 0, total_steps
    return {"tinit": tinit, "tfinal": tfinal, "deltaT": max(budgeting // 10, 1)}


def _lora_config(spec: TrainingSpec, total_steps: int, scorer: bool) -> Any:
    """PEFT's config of the adapter a fresh run trains: LoRA (rsLoRA, DoRA) or AdaLoRA."""
    from peft import AdaLoraConfig, LoraConfig

    common: dict[str, Any] = {
        "lora_alpha": spec.lora.alpha,
        "lora_dropout": spec.lora.dropout,
        "target_modules": spec.lora.target_modules,
        "bias": "none",
        "task_type": "SEQ_CLS" if scorer else "CAUSAL_LM",
        # A reward model's new head is trained whole and saved with the adapter.
        "modules_to_save": ["score"] if scorer else None,
    }
    if spec.lora.type is LoraType.ADALORA:
        return AdaLoraConfig(
            init_r=spec.lora.r,
            target_r=spec.lora.kept_rank,
            total_step=total_steps,
            **adalora_schedule(total_steps),
            **common,
        )
    return LoraConfig(
        r=spec.lora.r, use_rslora=spec.lora.use_rslora, use_dora=spec.lora.use_dora, **common
    )


def _fsdp_arguments(model: Any, spec: TrainingSpec) -> dict[str, Any]:
    """The Trainer's FSDP2 settings: every decoder layer its own shard unit, checkpoints saved
    sharded (each rank writes its share), activation checkpointing done by FSDP when on."""
    layers = sorted(set(getattr(model, "_no_split_modules", None) or []))
    if not layers:
        raise ValueError(
            f"FSDP needs the model's decoder layer class to shard by; {type(model).__name__} "
            'names none (_no_split_modules). Use "distributed": "ddp".'
        )
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {
            "version": 2,
            "transformer_layer_cls_to_wrap": layers,
            "state_dict_type": "SHARDED_STATE_DICT",
            "reshard_after_forward": True,
            "activation_checkpointing": spec.gradient_checkpointing,
        },
        # FSDP recomputes activations itself; the Trainer's own way would do it twice.
        "gradient_checkpointing": False,
    }


def _sharded_on_cpu(trainer_class: Any) -> Any:
    """trainer_class sharding with FSDP2 on CPU ranks (gloo) too. accelerate turns FSDP on only
    for accelerator devices and makes CPU ranks DDP; PyTorch's FSDP2 itself runs on gloo. So on
    CPUs (tests, CPU-only nodes) the Trainer's accelerator is switched to FSDP right after it is
    made, before it prepares the model, with the plugin the Trainer's arguments describe."""

    class CpuShardedTrainer(trainer_class):  # type: ignore[misc]
        def create_accelerator_and_postprocess(self) -> None:
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            super().create_accelerator_and_postprocess()
            state = self.accelerator.state
            if state.distributed_type is DistributedType.MULTI_CPU:
                state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                state.distributed_type = DistributedType.FSDP
                self.is_fsdp_enabled = True

    CpuShardedTrainer.__name__ = f"CpuSharded{trainer_class.__name__}"
    return CpuShardedTrainer


@contextmanager
def _lm_head_on_trained_positions(enabled: bool) -> Iterator[None]:
    """SFTTrainer's fused LM head (TRL's add_fused_lm_head) projects the vocabulary only at the
    positions whose next token is learned where Triton runs (CUDA, XPU), and at every position
    elsewhere, so that devices compiling fixed tile shapes (Neuron) see one shape. On CPUs that
    wastes the vocabulary-wide projection, and its backward, on every prompt and user token:
    here it scores the learned positions everywhere (the same per-token log-probabilities)."""
    from trl.trainer import utils

    trl_utils: Any = utils  # its private switch, read by the fused forward alone
    original = getattr(trl_utils, "_use_triton", None)
    if not enabled or original is None:
        yield
        return
    trl_utils._use_triton = lambda _device: True
    try:
        yield
    finally:
        trl_utils._use_triton = original


def _whole_adapter(model: Any) -> dict[str, Any]:
    """The adapter's weights of an FSDP-sharded model, each gathered whole (every rank takes
    part, in the same order); the frozen base stays sharded."""
    whole = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name or "modules_to_save" in name:
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            whole[name] = full.detach().cpu().clone()
    return whole


def _total_steps(spec: TrainingSpec, rows: int) -> int:
    """The optimizer steps the Trainer will take over rows, on every rank of the run."""
    import torch.distributed as dist

    from app.jobs.steps import total_steps

    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return total_steps(rows, spec.hyperparameters.model_dump(), world_size)


RANK_PATTERN_FILE = "adalora_rank_pattern.json"


def _adalora_budget(resume_from: str | None) -> Any:
    from transformers import TrainerCallback

    class AdaLoraBudget(TrainerCallback):
        """AdaLoRA's rank allocation after every optimizer step (before gradients are zeroed:
        it scores singular values by their gradients).

        PEFT saves an AdaLoRA adapter cut to its kept ranks whenever its config holds a rank
        pattern, and such a checkpoint no longer loads into the full-rank model a resumed run
        builds. So the pattern lives here, not in the config, while training runs: checkpoints
        keep every rank (the pruned singular values are zeros), the pattern goes beside them in
        a file a resumed run reads back, and the config gets it back for the final save."""

        def __init__(self) -> None:
            self.pattern: dict[str, list[bool]] | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:  # noqa: ARG002
            saved = Path(resume_from or "") / RANK_PATTERN_FILE
            if resume_from is not None and saved.is_file():
                self.pattern = json.loads(saved.read_text())

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: ARG002
            config = self._config(kwargs["model"])
            config.rank_pattern = self.pattern
            kwargs["model"].base_model.update_and_allocate(state.global_step)
            self.pattern, config.rank_pattern = config.rank_pattern, None

        def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:  # noqa: ARG002
            if self.pattern is not None and state.is_world_process_zero:
                directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                (directory / RANK_PATTERN_FILE).write_text(json.dumps(self.pattern))

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: ARG002
            self._config(kwargs["model"]).rank_pattern = self.pattern

        @staticmethod
        def _config(model: Any) -> Any:
            return model.peft_config[model.active_adapter]

    return AdaLoraBudget()


def train_lora(
    spec: TrainingSpec,
    train_records: list[dict[str, Any]],
    eval_records: list[dict[str, Any]] | None,
    output_dir: Path,
    hooks: TrainingHooks | None = None,
    extra_callbacks: list[Any] | None = None,
    *,
    tokenizer: Any = None,
) -> TrainingResult:
    """Train a LoRA adapter with the job's method (TRL's SFTTrainer; DPOTrainer, ORPOTrainer or
    RewardTrainer on preference rows; GRPOTrainer on prompt rows) and save it (PEFT format) into
    output_dir/adapter. tokenizer: the base model's, already loaded for this job (the dataset
    validation's, worker/datasets.py); None: loaded here. The trainers may set its padding
    token, so it is not shared with other jobs."""
    import torch
    from datasets import Dataset
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from trl import (  # type: ignore[attr-defined]
        DPOConfig,
        DPOTrainer,
        GRPOConfig,
        GRPOTrainer,
        RewardConfig,
        RewardTrainer,
        SFTConfig,
        SFTTrainer,
    )

    hooks = hooks or TrainingHooks()
    hp = spec.hyperparameters
    started = time.monotonic()
    preference = spec.method.learns_preferences

    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(
            spec.model_location, trust_remote_code=False, **spec.model_kwargs
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    scorer = spec.method.type is MethodType.REWARD_MODEL
    # A reward model is the base model with a one-number head: it scores, it does not generate.
    loader: Any = AutoModelForSequenceClassification if scorer else AutoModelForCausalLM
    quantized = quantization_config(spec.quantization, spec.bf16, spec.distributed == "fsdp")
    model: Any = loader.from_pretrained(
        spec.model_location,
        # The frozen base in bf16 on GPUs that train in it (half the memory; PEFT keeps the
        # adapter in fp32); fp32 on CPUs, where bf16 matmuls are emulated or slow.
        dtype=torch.bfloat16 if spec.bf16 and torch.cuda.is_available() else torch.float32,
        trust_remote_code=False,
        use_safetensors=True,
        **({"num_labels": 1} if scorer else {}),
        **({"quantization_config": quantized} if quantized is not None else {}),
        **spec.model_kwargs,
    )
    if quantized is not None:
        # PEFT's k-bit recipe: every weight frozen, the ones left unquantized (embeddings,
        # norms) in fp32, and inputs that carry gradients when activations are recomputed.
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=spec.gradient_checkpointing
        )
    if scorer:
        model.config.pad_token_id = tokenizer.pad_token_id

    reinforcement = spec.method.reinforcement

    def dataset(records: list[dict[str, Any]]) -> Any:
        # Preference and prompt rows go as they are (TRL applies the chat template to
        # conversational ones); supervised rows as token ids with their loss mask.
        if reinforcement is not None:
            return Dataset.from_list(prompt_rows(records))
        if preference:
            return Dataset.from_list(records)
        return Dataset.from_list(trained_tokens(tokenizer, records, hp.max_seq_length))

    train_dataset = dataset(train_records)
    # GRPO's own evaluation would write num_generations answers to every row at each eval; the
    # job's evaluation stage measures the grader's mean reward on held-out prompts instead.
    eval_dataset = dataset(eval_records) if eval_records and reinforcement is None else None

    common: dict[str, Any] = {
        "output_dir": str(output_dir / "trainer"),
        "num_train_epochs": hp.n_epochs,
        "learning_rate": hp.learning_rate,
        "per_device_train_batch_size": hp.batch_size,
        "per_device_eval_batch_size": hp.batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "max_length": hp.max_seq_length,
        "warmup_steps": hp.warmup_ratio,
        "lr_scheduler_type": hp.lr_scheduler.value,
        "weight_decay": hp.weight_decay,
        "seed": hp.seed,
        "data_seed": hp.seed,
        "bf16": spec.bf16,
        # TRL turns activation checkpointing on by default: a second forward pass in every
        # backward. Only a job that would not fit in memory without it pays that.
        "gradient_checkpointing": spec.gradient_checkpointing,
        "use_cpu": not torch.cuda.is_available(),
        "logging_steps": 1,
        "eval_strategy": _eval_strategy(eval_dataset is not None, hp.eval_every_steps),
        "eval_steps": hp.eval_every_steps,
        "save_strategy": "steps",
        "save_steps": spec.checkpoint_every_steps,
        "save_total_limit": spec.checkpoints_kept,
        "report_to": "none",
        "disable_tqdm": True,
        "include_num_input_tokens_seen": "non_padding",
        "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": False,
        "dataset_num_proc": None,
        **(_fsdp_arguments(model, spec) if spec.distributed == "fsdp" else {}),
    }
    lora_config = None
    supervised = reinforcement is None and not preference and not scorer
    # The Trainer's evaluation after the last step would score the eval rows just as the job's
    # evaluation does right after: a supervised run handing its model over scores them once.
    last_eval_here = hooks.evaluate_trained is not None and supervised and eval_dataset is not None
    reporter = _make_callback(spec, hooks, last_eval_here)
    callbacks = [reporter, *(extra_callbacks or [])]
    if spec.start_from is not None:
        # The parent's weights and config, trainable: the run goes on from where it ended (DPO's
        # reference is then a frozen copy of the parent, not the base model).
        model = PeftModel.from_pretrained(model, spec.start_from, is_trainable=True)
    else:
        lora_config = _lora_config(spec, _total_steps(spec, len(train_records)), scorer)
        if spec.lora.type is LoraType.ADALORA:
            # First: its pattern file is in a checkpoint before the checkpoint is reported.
            callbacks.insert(0, _adalora_budget(spec.resume_from))
    # TRL's trainer for the method, and its config: the common arguments plus the method's own.
    trainer_class: Any
    args: Any
    extra: dict[str, Any] = {}
    if reinforcement is not None:
        from worker.rewards import RewardModels, reward_function

        trainer_class = GRPOTrainer
        group = reinforcement.num_generations
        for key in ("max_length", "dataset_num_proc"):
            common.pop(key)
        args = GRPOConfig(
            **{
                **common,
                # batch_size counts prompts; each brings its group of answers to the step.
                "per_device_train_batch_size": hp.batch_size * group,
                "per_device_eval_batch_size": hp.batch_size * group,
            },
            num_generations=group,
            max_completion_length=reinforcement.max_completion_length,
            temperature=reinforcement.temperature,
            beta=reinforcement.beta,
            remove_unused_columns=False,  # the grader reads the row's fields
        )
        reward_models = RewardModels(
            spec.model_location, spec.reward_models, spec.model_kwargs, spec.bf16
        )
        extra["reward_funcs"] = [reward_function(reinforcement.grader, reward_models)]
    elif scorer:
        trainer_class, args = RewardTrainer, RewardConfig(**common)
    elif spec.method.orpo is not None:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer_class, args = ORPOTrainer, ORPOConfig(**common, beta=spec.method.orpo.beta)
    elif spec.method.dpo is not None:
        trainer_class = DPOTrainer
        args = DPOConfig(**common, **_preference_loss(spec.method.dpo))
    else:  # supervised
        trainer_class = SFTTrainer
        unpadded = {
            # Rows come cut to max_seq_length (trained_tokens): padding-free batches take them
            # as they are. Every token of such a batch is a row's (the pad token, which is also
            # a row's end-of-turn token here, must not be taken for padding).
            "max_length": None,
            "include_num_input_tokens_seen": "all",
        }
        args = SFTConfig(
            **{**common, **(unpadded if spec.padding_free else {})},
            # Padding-free: a batch's rows are laid end to end in one sequence, each with its
            # own positions, and no padding is computed. Attention stays within each row: with
            # no cache, transformers builds the block-diagonal causal mask from the positions
            # (test_padding_free_rows_never_attend_to_each_other).
            padding_free=spec.padding_free,
            packing=False,
            # Rows of similar length per batch, as before: batches of even size.
            train_sampling_strategy="group_by_length",
        )
        # A cache is never read in training, and with one transformers would not see the
        # rows' boundaries in the positions.
        model.config.use_cache = False
    if spec.distributed == "fsdp" and not torch.cuda.is_available():
        trainer_class = _sharded_on_cpu(trainer_class)
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config,
        callbacks=callbacks,
        **extra,
    )
    steps_started = time.monotonic()
    with _lm_head_on_trained_positions(spec.trained_positions_only and supervised):
        output = trainer.train(resume_from_checkpoint=spec.resume_from)
    steps_seconds = time.monotonic() - steps_started
    state = trainer.state
    stopped_early = state.global_step < state.max_steps

    eval_losses = [entry["eval_loss"] for entry in state.log_history if "eval_loss" in entry]
    eval_loss = float(eval_losses[-1]) if eval_losses else None
    kept_ranks = None
    gathered = _whole_adapter(trainer.model) if trainer.is_fsdp_enabled else None
    if not stopped_early and trainer.is_world_process_zero():
        adapter_dir = output_dir / "adapter"
        # Only the trained adapter (DPO from a parent also holds its frozen "ref" copy).
        trainer.model.save_pretrained(
            str(adapter_dir),
            safe_serialization=True,
            selected_adapters=["default"],
            **({"state_dict": gathered} if gathered is not None else {}),
        )
        tokenizer.save_pretrained(str(adapter_dir))
        if spec.lora.type is LoraType.ADALORA and spec.start_from is None:
            kept_ranks = adalora.to_lora(adapter_dir)
    evaluation, evaluation_started = None, time.monotonic()
    if hooks.evaluate_trained is not None and not stopped_early:
        from worker.inference_layers import inference_layers

        eval_row_losses = None
        trainer.model.eval()
        with inference_layers(trainer.model, spec.bf16):
            if last_eval_here:
                from worker.evaluation import row_losses, token_mean

                eval_row_losses = row_losses(
                    trainer.model, tokenizer, eval_records or [], spec.bf16
                )
                eval_loss = token_mean(eval_row_losses)
                reporter.report_eval_loss(eval_loss)
            evaluation = hooks.evaluate_trained(trainer.model, tokenizer, eval_row_losses)
    evaluation_seconds = time.monotonic() - evaluation_started
    return TrainingResult(
        steps=state.global_step,
        total_steps=state.max_steps,
        stopped_early=stopped_early,
        train_loss=float(output.training_loss) if output.training_loss is not None else None,
        eval_loss=eval_loss,
        trained_tokens=int(getattr(state, "num_input_tokens_seen", 0) or 0),
        seconds=time.monotonic() - started,
        kept_ranks=kept_ranks,
        steps_seconds=round(steps_seconds, 2),
        evaluation=evaluation,
        evaluation_seconds=round(evaluation_seconds, 2),
    )
