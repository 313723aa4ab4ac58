"""Score a trained adapter against its base model: the loss both get on rows the adapter was
not trained on (the same tokens the training learned: assistant turns, completions), and a few
answers of both, side by side. A plain function of (model, rows): a single-process run hands
over the model it has just trained (worker/training.py), others load the saved adapter again
(evaluate_saved); the job stores what it returns as its `evaluation`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.datasets.loss_mask import one_side, prompt_ids, token_mask
from app.evaluation.split import Split
from app.graders import grade
from app.jobs.schemas import ReinforcementSettings
from worker.base_side import BaseSide, BaseSides
from worker.inference_layers import adapter_rows, inference_layers, mixes_rows

if TYPE_CHECKING:
    from worker.rewards import RewardModels

BATCH_ROWS = 8
MAX_SAMPLE_TOKENS = 64


@dataclass(frozen=True)
class SamplePrompt:
    shown: str  # the user's words, as the job page shows them
    reference: str | None
    input_ids: list[int]


def sample_prompt(tokenizer: Any, record: dict[str, Any]) -> SamplePrompt | None:
    """The prompt of a row and its reference answer; None for rows without a prompt (text)."""
    if "item" in record:  # a reinforcement prompt: no answer, the grader judges
        prompt = record["prompt"]
        shown = prompt if isinstance(prompt, str) else _last_user_words(prompt)
        return SamplePrompt(shown, None, prompt_ids(tokenizer, prompt))
    if "messages" in record:
        messages = record["messages"]
        last = max(
            (i for i, message in enumerate(messages) if message["role"] == "assistant"),
            default=None,
        )
        if not last:
            return None
        context = messages[:last]
        users = [message["content"] for message in context if message["role"] == "user"]
        ids = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return SamplePrompt(
            shown=users[-1] if users else str(context[-1]["content"]),
            reference=str(messages[last]["content"]),
            input_ids=list(ids),
        )
    if "prompt" in record:
        ids = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        return SamplePrompt(record["prompt"], record.get("completion"), list(ids))
    return None


def _last_user_words(messages: list[dict[str, str]]) -> str:
    users = [message["content"] for message in messages if message["role"] == "user"]
    return users[-1] if users else str(messages[-1]["content"])


def _precision(bf16: bool, device: Any) -> contextlib.AbstractContextManager[Any]:
    import torch

    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def mean_loss(model: Any, tokenizer: Any, records: list[dict[str, Any]], bf16: bool) -> float:
    """Mean cross-entropy over every trained token of records (token-weighted)."""
    return token_mean(row_losses(model, tokenizer, records, bf16))


def token_mean(losses: list[tuple[float, int]]) -> float:
    return sum(total for total, _count in losses) / max(sum(n for _total, n in losses), 1)


def preference_accuracy(
    model: Any, tokenizer: Any, records: list[dict[str, Any]], bf16: bool
) -> float:
    """The share of preference rows whose chosen answer the model finds likelier than the
    rejected one (summed log-probability of the answer's tokens)."""
    chosen = row_losses(model, tokenizer, [one_side(r, "chosen") for r in records], bf16)
    rejected = row_losses(model, tokenizer, [one_side(r, "rejected") for r in records], bf16)
    wins = sum(c < r for (c, _), (r, _) in zip(chosen, rejected, strict=True))
    return wins / max(len(records), 1)


MAX_BATCH_TOKENS = 512  # tokens of rows laid end to end in one forward pass (fastest on CPU)


def row_losses(
    model: Any, tokenizer: Any, records: list[dict[str, Any]], bf16: bool
) -> list[tuple[float, int]]:
    """(summed cross-entropy, trained tokens) of each record.

    Rows go end to end in one sequence per forward pass, each with its own positions and no
    padding (with no cache, transformers masks attention block by block from the positions, as
    in padding-free training), and the LM head projects only the positions whose next token is
    trained: the prompt's and the user's tokens cost no vocabulary-wide logits."""
    import torch

    device = next(model.parameters()).device
    examples = [token_mask(tokenizer, record) for record in records]
    found: list[tuple[float, int]] = []
    for batch in _token_batches([len(ids) for ids, _mask in examples], MAX_BATCH_TOKENS):
        input_ids: list[int] = []
        positions: list[int] = []
        kept: list[int] = []  # positions in the sequence whose next token is trained
        targets: list[int] = []
        owners: list[int] = []  # the batch row of each kept position
        for row, (ids, mask) in enumerate(examples[index] for index in batch):
            offset = len(input_ids)
            input_ids += ids
            positions += range(len(ids))
            for position in range(len(ids) - 1):
                if mask[position + 1]:
                    kept.append(offset + position)
                    targets.append(ids[position + 1])
                    owners.append(row)
        sums = torch.zeros(len(batch), dtype=torch.float64)
        if kept:
            with torch.no_grad(), _precision(bf16, device):
                logits = (
                    model(
                        input_ids=torch.tensor([input_ids], device=device),
                        position_ids=torch.tensor([positions], device=device),
                        use_cache=False,
                        logits_to_keep=torch.tensor(kept, device=device),
                    )
                    .logits[0]
                    .float()
                )
            losses = torch.nn.functional.cross_entropy(
                logits, torch.tensor(targets, device=device), reduction="none"
            )
            sums.index_add_(0, torch.tensor(owners), losses.cpu().double())
        counts = torch.bincount(torch.tensor(owners, dtype=torch.long), minlength=len(batch))
        found += [(float(sums[row]), int(counts[row])) for row in range(len(batch))]
    return found


def _token_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive indices of rows, grouped so that each group's rows together hold at most
    max_tokens tokens (a longer row goes alone)."""
    batches: list[list[int]] = []
    total = 0
    for index, length in enumerate(lengths):
        if batches and total + length <= max_tokens:
            batches[-1].append(index)
            total += length
        else:
            batches.append([index])
            total = length
    return batches


def _generated(
    model: Any,
    tokenizer: Any,
    prompts: list[SamplePrompt],
    max_new_tokens: int,
    bf16: bool,
) -> list[str]:
    """Greedy answers to prompts, in one left-padded batch. The key/value cache is the inference
    engine's (app/inference/kv_cache.py): it grows in place, where transformers' copies every
    layer's keys and values at every step."""
    import torch

    from app.inference.kv_cache import decoding_cache

    device = next(model.parameters()).device
    width = max(len(prompt.input_ids) for prompt in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt.input_ids) :] = torch.tensor(prompt.input_ids)
        attention[row, width - len(prompt.input_ids) :] = 1
    with torch.no_grad(), _precision(bf16, device):
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            use_cache=True,  # a model fresh from training has its cache turned off
            past_key_values=decoding_cache(),
        )
    return [
        tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output.tolist()
    ]


def answers(
    model: Any, tokenizer: Any, prompts: list[SamplePrompt], max_new_tokens: int, bf16: bool
) -> list[str]:
    """Greedy answers to prompts of the model as it is (with its adapter on or off)."""
    if not prompts:
        return []
    return _generated(model, tokenizer, prompts, max_new_tokens, bf16)


def answers_of_both(
    model: Any, tokenizer: Any, prompts: list[SamplePrompt], max_new_tokens: int, bf16: bool
) -> tuple[list[str], list[str]]:
    """(the adapter's, the base model's) greedy answers to prompts. Where the adapter's rows and
    the base model's can share a batch (plain LoRA, worker/inference_layers.py), both come from
    one generation: a decoding step of twice the rows costs little more on a CPU than one of
    the rows alone."""
    if not prompts:
        return [], []
    if mixes_rows(model):
        with adapter_rows([True] * len(prompts) + [False] * len(prompts)):
            both = _generated(model, tokenizer, prompts + prompts, max_new_tokens, bf16)
        return both[: len(prompts)], both[len(prompts) :]
    adapter = answers(model, tokenizer, prompts, max_new_tokens, bf16)
    with model.disable_adapter():
        return adapter, answers(model, tokenizer, prompts, max_new_tokens, bf16)


def with_adapter(
    model_location: str, adapter_dir: Path, kwargs: dict[str, Any], *, scorer: bool = False
) -> tuple[Any, Any]:
    """(tokenizer, base model with the adapter, for inference): a generating model, or with
    `scorer` a one-number sequence classifier (a reward model)."""
    import torch
    from peft import PeftModel
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_location, trust_remote_code=False, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    loader: Any = AutoModelForSequenceClassification if scorer else AutoModelForCausalLM
    base: Any = loader.from_pretrained(
        model_location,
        dtype=torch.float32,
        trust_remote_code=False,
        use_safetensors=True,
        **({"num_labels": 1} if scorer else {}),
        **kwargs,
    )
    if scorer:
        base.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    return tokenizer, model


def _losses(base_loss: float, adapter_loss: float) -> dict[str, float]:
    return {
        "base_eval_loss": round(base_loss, 6),
        "adapter_eval_loss": round(adapter_loss, 6),
        "improvement": round((base_loss - adapter_loss) / base_loss, 6) if base_loss else 0.0,
    }


@dataclass(frozen=True)
class EvaluationTask:
    """What a job's evaluation scores, and how: everything but the model."""

    records: list[dict[str, Any]]  # the rows scored, not trained on where the data allowed
    split: Split
    samples: int  # answers of each side kept to show
    bf16: bool
    scorer: bool = False  # a reward model: it ranks preference pairs, it does not write
    reinforcement: ReinforcementSettings | None = None
    reward_models: RewardModels | None = None
    # Where the base model's side of supervised and preference evaluations is kept
    # (worker/base_side.py); None: computed every time.
    base_sides: BaseSides | None = None


def evaluate(
    tokenizer: Any,
    model: Any,
    task: EvaluationTask,
    *,
    adapter_losses: list[tuple[float, int]] | None = None,
) -> dict[str, Any]:
    """The job's `evaluation` (app/jobs/schemas.py Evaluation) of model, a PEFT model whose
    adapter is the one trained: in memory right after training, or loaded (evaluate_saved).
    adapter_losses: the adapter's row_losses on task.records when already known."""
    started = time.monotonic()
    model.eval()
    with inference_layers(model, task.bf16):
        if task.reinforcement is not None:
            assert task.reward_models is not None
            found = _reinforcement(tokenizer, model, task, task.reinforcement, task.reward_models)
        elif task.scorer:
            found = _reward_model(tokenizer, model, task)
        else:
            found = _supervised(tokenizer, model, task, adapter_losses)
    return {**found, "seconds": round(time.monotonic() - started, 2)}


def evaluate_saved(
    model_location: str,
    adapter_dir: Path,
    task: EvaluationTask,
    model_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """evaluate() of the adapter in adapter_dir, loaded on its base model (in full precision,
    as the inference engine serves it)."""
    started = time.monotonic()
    tokenizer, model = with_adapter(
        model_location, adapter_dir, model_kwargs or {}, scorer=task.scorer
    )
    return {**evaluate(tokenizer, model, task), "seconds": round(time.monotonic() - started, 2)}


def _supervised(
    tokenizer: Any,
    model: Any,
    task: EvaluationTask,
    adapter_losses: list[tuple[float, int]] | None,
) -> dict[str, Any]:
    """Losses of base and adapter on the rows' trained tokens, and greedy answers of both. The
    base model's side comes from task.base_sides where an earlier evaluation of the same rows
    on the same base model kept it (worker/base_side.py); else it is computed, and kept."""
    records = task.records
    pairs = records if records and "chosen" in records[0] else None
    if pairs is not None:  # preference rows: losses and samples on the chosen answers
        records = [one_side(record, "chosen") for record in pairs]
        adapter_losses = None

    prompts = [p for p in (sample_prompt(tokenizer, r) for r in records) if p][: task.samples]
    longest = max(
        (len(tokenizer(p.reference)["input_ids"]) for p in prompts if p.reference), default=32
    )
    max_new_tokens = min(MAX_SAMPLE_TOKENS, longest + 8)

    sides, kept_as = task.base_sides, None
    if sides is not None:
        scored = [token_mask(tokenizer, record) for record in records]
        if pairs is not None:
            scored += [token_mask(tokenizer, one_side(record, "rejected")) for record in pairs]
        asked = [prompt.input_ids for prompt in prompts]
        kept_as = sides.key(model, [scored, asked, max_new_tokens, task.bf16])
    base = sides.get(kept_as) if sides is not None and kept_as is not None else None

    if adapter_losses is None:
        adapter_losses = row_losses(model, tokenizer, records, task.bf16)
    adapter_loss = token_mean(adapter_losses)
    if base is None:
        adapter_answers, base_answers = answers_of_both(
            model, tokenizer, prompts, max_new_tokens, task.bf16
        )
    else:
        adapter_answers = answers(model, tokenizer, prompts, max_new_tokens, task.bf16)
    preference: dict[str, float] = {}
    if pairs is not None:
        preference["adapter_preference_accuracy"] = preference_accuracy(
            model, tokenizer, pairs, task.bf16
        )
    reused = base is not None
    if base is None:
        with model.disable_adapter():
            base = BaseSide(
                mean_loss(model, tokenizer, records, task.bf16),
                base_answers,
                None if pairs is None else preference_accuracy(model, tokenizer, pairs, task.bf16),
            )
        if sides is not None and kept_as is not None:
            sides.put(kept_as, base)
    if base.preference_accuracy is not None:
        preference["base_preference_accuracy"] = base.preference_accuracy
    return {
        **{key: round(value, 6) for key, value in preference.items()},
        "split": task.split,
        "rows": len(records),
        **_losses(base.loss, adapter_loss),
        "base_side_reused": reused,
        "samples": [
            {"prompt": p.shown, "reference": p.reference, "base": b, "adapter": a}
            for p, b, a in zip(prompts, base.answers, adapter_answers, strict=True)
        ],
    }


def reward_scores(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], bf16: bool
) -> list[float]:
    """A reward model's score of each chat or prompt-completion row."""
    import torch

    device = next(model.parameters()).device
    texts = [
        tokenizer.apply_chat_template(row["messages"], tokenize=False)
        if "messages" in row
        else row["prompt"] + row["completion"]
        for row in rows
    ]
    found: list[float] = []
    for start in range(0, len(texts), BATCH_ROWS):
        batch = tokenizer(texts[start : start + BATCH_ROWS], padding=True, return_tensors="pt")
        with torch.no_grad(), _precision(bf16, device):
            logits = model(**{key: value.to(device) for key, value in batch.items()}).logits
        found += [float(score) for score in logits[:, 0].float()]
    return found


def _ranking(
    model: Any, tokenizer: Any, pairs: list[dict[str, Any]], bf16: bool
) -> tuple[float, float]:
    """(pair accuracy, mean Bradley-Terry loss) of a reward model on preference rows."""
    import math

    chosen = reward_scores(model, tokenizer, [one_side(row, "chosen") for row in pairs], bf16)
    rejected = reward_scores(model, tokenizer, [one_side(row, "rejected") for row in pairs], bf16)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    accuracy = sum(margin > 0 for margin in margins) / max(len(margins), 1)
    # log(1 + e^-m), written so a large margin of either sign cannot overflow.
    losses = [max(-m, 0.0) + math.log1p(math.exp(-abs(m))) for m in margins]
    loss = sum(losses) / max(len(losses), 1)
    return accuracy, loss


def _reward_model(tokenizer: Any, model: Any, task: EvaluationTask) -> dict[str, Any]:
    """How often a reward model scores the chosen answer above the rejected one (and its
    pairwise loss), against the untrained head on the same base model."""
    adapter_accuracy, adapter_loss = _ranking(model, tokenizer, task.records, task.bf16)
    with model.disable_adapter():  # the base model with its new, untrained head
        base_accuracy, base_loss = _ranking(model, tokenizer, task.records, task.bf16)
    return {
        "split": task.split,
        "rows": len(task.records),
        **_losses(base_loss, adapter_loss),
        "base_preference_accuracy": round(base_accuracy, 6),
        "adapter_preference_accuracy": round(adapter_accuracy, 6),
        "samples": [],
    }


def _reinforcement(
    tokenizer: Any,
    model: Any,
    task: EvaluationTask,
    reinforcement: ReinforcementSettings,
    reward_models: RewardModels,
) -> dict[str, Any]:
    """The grader's mean reward of the greedy answers the base model and the adapter write to
    prompts the adapter was not trained on."""
    prompts = [p for p in (sample_prompt(tokenizer, r) for r in task.records) if p]
    items = [record["item"] for record in task.records]
    length = reinforcement.max_completion_length
    adapter_answers: list[str] = []
    base_answers: list[str] = []
    for start in range(0, len(prompts), BATCH_ROWS):
        adapter, base = answers_of_both(
            model, tokenizer, prompts[start : start + BATCH_ROWS], length, task.bf16
        )
        adapter_answers += adapter
        base_answers += base

    def mean_reward(written: list[str]) -> float:
        rewards = grade(reinforcement.grader, items, written, reward_model_scorer=reward_models)
        return sum(rewards) / max(len(rewards), 1)

    return {
        "split": task.split,
        "rows": len(task.records),
        "base_mean_reward": round(mean_reward(base_answers), 6),
        "adapter_mean_reward": round(mean_reward(adapter_answers), 6),
        "samples": [
            {"prompt": p.shown, "reference": None, "base": b, "adapter": a}
            for p, b, a in list(zip(prompts, base_answers, adapter_answers, strict=True))[
                : task.samples
            ]
        ],
    }
