"""Score a trained adapter against its base model: the loss both get on rows the adapter was
not trained on (the same tokens the training learned: assistant turns, completions), and a few
answers of both, side by side. A plain function of (model, adapter, rows); the runner stores
what it returns as the job's `evaluation`.
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
    losses = row_losses(model, tokenizer, records, bf16)
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


def row_losses(
    model: Any, tokenizer: Any, records: list[dict[str, Any]], bf16: bool
) -> list[tuple[float, int]]:
    """(summed cross-entropy, trained tokens) of each record."""
    import torch

    device = next(model.parameters()).device
    found: list[tuple[float, int]] = []
    examples = [token_mask(tokenizer, record) for record in records]
    for start in range(0, len(examples), BATCH_ROWS):
        batch = examples[start : start + BATCH_ROWS]
        width = max(len(ids) for ids, _mask in batch)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, (ids, mask) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            labels[row, : len(ids)] = torch.tensor(
                [token if trained else -100 for token, trained in zip(ids, mask, strict=True)]
            )
        with torch.no_grad(), _precision(bf16, device):
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention.to(device)
            ).logits.float()
        shifted = labels[:, 1:].to(device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), shifted, ignore_index=-100, reduction="none"
        )
        for row in range(len(batch)):
            found.append((float(losses[row].sum()), int((shifted[row] != -100).sum())))
    return found


def answers(
    model: Any, tokenizer: Any, prompts: list[SamplePrompt], max_new_tokens: int, bf16: bool
) -> list[str]:
    """Greedy answers to prompts, in one left-padded batch."""
    import torch

    if not prompts:
        return []
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
        )
    return [
        tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output.tolist()
    ]


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


def evaluate_adapter(
    model_location: str,
    adapter_dir: Path,
    records: list[dict[str, Any]],
    *,
    split: Split,
    samples: int,
    bf16: bool,
    model_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The job's `evaluation` (app/jobs/schemas.py Evaluation) for the adapter in adapter_dir."""
    started = time.monotonic()
    pairs = records if records and "chosen" in records[0] else None
    if pairs is not None:  # preference rows: losses and samples on the chosen answers
        records = [one_side(record, "chosen") for record in pairs]
    tokenizer, model = with_adapter(model_location, adapter_dir, model_kwargs or {})

    prompts = [p for p in (sample_prompt(tokenizer, r) for r in records) if p][:samples]
    longest = max(
        (len(tokenizer(p.reference)["input_ids"]) for p in prompts if p.reference), default=32
    )
    max_new_tokens = min(MAX_SAMPLE_TOKENS, longest + 8)

    adapter_loss = mean_loss(model, tokenizer, records, bf16)
    adapter_answers = answers(model, tokenizer, prompts, max_new_tokens, bf16)
    preference: dict[str, float] = {}
    if pairs is not None:
        preference["adapter_preference_accuracy"] = preference_accuracy(
            model, tokenizer, pairs, bf16
        )
    with model.disable_adapter():
        base_loss = mean_loss(model, tokenizer, records, bf16)
        base_answers = answers(model, tokenizer, prompts, max_new_tokens, bf16)
        if pairs is not None:
            preference["base_preference_accuracy"] = preference_accuracy(
                model, tokenizer, pairs, bf16
            )
    return {
        **{key: round(value, 6) for key, value in preference.items()},
        "split": split,
        "rows": len(records),
        **_losses(base_loss, adapter_loss),
        "samples": [
            {"prompt": p.shown, "reference": p.reference, "base": b, "adapter": a}
            for p, b, a in zip(prompts, base_answers, adapter_answers, strict=True)
        ],
        "seconds": round(time.monotonic() - started, 2),
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


def evaluate_reward_model(
    model_location: str,
    adapter_dir: Path,
    pairs: list[dict[str, Any]],
    *,
    split: Split,
    bf16: bool,
    model_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A reward model's `evaluation`: how often it scores the chosen answer above the rejected
    one (and its pairwise loss), against the untrained head on the same base model."""
    started = time.monotonic()
    tokenizer, model = with_adapter(model_location, adapter_dir, model_kwargs or {}, scorer=True)
    adapter_accuracy, adapter_loss = _ranking(model, tokenizer, pairs, bf16)
    with model.disable_adapter():  # the base model with its new, untrained head
        base_accuracy, base_loss = _ranking(model, tokenizer, pairs, bf16)
    return {
        "split": split,
        "rows": len(pairs),
        **_losses(base_loss, adapter_loss),
        "base_preference_accuracy": round(base_accuracy, 6),
        "adapter_preference_accuracy": round(adapter_accuracy, 6),
        "samples": [],
        "seconds": round(time.monotonic() - started, 2),
    }


def evaluate_reinforcement(
    model_location: str,
    adapter_dir: Path,
    records: list[dict[str, Any]],
    *,
    split: Split,
    samples: int,
    bf16: bool,
    reinforcement: ReinforcementSettings,
    reward_models: RewardModels,
    model_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A reinforcement job's `evaluation`: the grader's mean reward of the greedy answers the
    base model and the adapter write to prompts the adapter was not trained on."""
    started = time.monotonic()
    tokenizer, model = with_adapter(model_location, adapter_dir, model_kwargs or {})
    prompts = [p for p in (sample_prompt(tokenizer, r) for r in records) if p]
    items = [record["item"] for record in records]
    length = reinforcement.max_completion_length

    def mean_reward() -> tuple[float, list[str]]:
        written: list[str] = []
        for start in range(0, len(prompts), BATCH_ROWS):
            written += answers(model, tokenizer, prompts[start : start + BATCH_ROWS], length, bf16)
        rewards = grade(reinforcement.grader, items, written, reward_model_scorer=reward_models)
        return sum(rewards) / max(len(rewards), 1), written

    adapter_reward, adapter_answers = mean_reward()
    with model.disable_adapter():
        base_reward, base_answers = mean_reward()
    return {
        "split": split,
        "rows": len(records),
        "base_mean_reward": round(base_reward, 6),
        "adapter_mean_reward": round(adapter_reward, 6),
        "samples": [
            {"prompt": p.shown, "reference": None, "base": b, "adapter": a}
            for p, b, a in list(zip(prompts, base_answers, adapter_answers, strict=True))[:samples]
        ],
        "seconds": round(time.monotonic() - started, 2),
    }
