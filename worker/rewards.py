"""Rewards for reinforcement (GRPO): the job's grader (app/graders) made into TRL's reward
function, the reward models its `reward_model` graders name, and the mean reward a model earns
on prompts (what the evaluation compares, base against adapter)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.graders import Grader, grade

RewardFunction = Callable[..., list[float]]


def answer_text(completion: Any) -> str:
    """A completion as TRL hands it over: text, or the assistant message(s) of a chat."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content") or "") for message in completion)


def conversation(item: dict[str, Any], answer: str) -> dict[str, Any]:
    """A prompt row's prompt with `answer` as the reply: what a reward model scores."""
    prompt = item.get("messages", item.get("prompt"))
    if isinstance(prompt, list):
        return {"messages": [*prompt, {"role": "assistant", "content": answer}]}
    return {"prompt": str(prompt or ""), "completion": answer}


@dataclass
class RewardModels:
    """The reward models of `reward_model` graders, loaded on first use: `adapters` maps the
    grader's `model` to the reward model's adapter directory here."""

    model_location: str
    adapters: dict[str, str]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    bf16: bool = False
    _loaded: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def __call__(self, name: str, answers: list[str], items: list[dict[str, Any]]) -> list[float]:
        from pathlib import Path

        from worker.evaluation import reward_scores, with_adapter

        if name not in self._loaded:
            self._loaded[name] = with_adapter(
                self.model_location, Path(self.adapters[name]), self.model_kwargs, scorer=True
            )
        tokenizer, model = self._loaded[name]
        rows = [conversation(item, answer) for item, answer in zip(items, answers, strict=True)]
        return reward_scores(model, tokenizer, rows, self.bf16)


def reward_function(grader: Grader, reward_models: RewardModels | None) -> RewardFunction:
    """TRL's reward function for GRPOTrainer: the grader's score of each completion, reading the
    row it answers from the dataset's `item` column (the row as JSON)."""

    def reward(completions: list[Any], item: list[str], **_: Any) -> list[float]:
        rows = [json.loads(text) for text in item]
        answers = [answer_text(completion) for completion in completions]
        return grade(grader, rows, answers, reward_model_scorer=reward_models)

    reward.__name__ = grader.name  # TRL logs rewards/<name>/mean
    return reward
