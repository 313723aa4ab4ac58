"""What every engine takes and gives: a `Generation` in; `TextDelta` pieces and one
`GenerationResult` out. The prompt is tokenized and checked here, the same for each engine."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from app.base_models.registry import BaseModel
from app.errors import InvalidRequest
from app.inference.schemas import FinishReason


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


@dataclass(frozen=True)
class Generation:
    base_model: BaseModel
    adapter_key: str | None  # the adapter id, or None for the base model alone
    adapter_path: str | None  # its key in the artifact store
    prompt: str | None
    messages: list[dict[str, str]] | None
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[str] | None
    seed: int | None


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class TextDelta:
    """The next piece of a streamed generation's text."""

    text: str


StreamItem = TextDelta | GenerationResult


class ClosingStream(Iterator[StreamItem]):
    """A generation's stream of `StreamItem`s that `close()`s (cancels its request) on leaving a
    `with` block; each engine says what closing does."""

    @abstractmethod
    def close(self) -> None:
        """Cancel the request: its engine stops decoding it."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def encode_prompt(tokenizer: Any, request: Generation) -> list[int]:
    """The prompt's token ids: messages through the chat template (with the generation
    prompt), or the raw prompt with the tokenizer's special tokens."""
    if request.messages is not None:
        text = tokenizer.apply_chat_template(
            request.messages, add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(request.prompt)["input_ids"]
    return [int(token) for token in ids]


def check_prompt(prompt_ids: list[int], max_new_tokens: int, context_length: int) -> None:
    """Raise (400) for an empty prompt, or one that leaves no room for max_new_tokens."""
    if not prompt_ids:
        raise InvalidRequest("The prompt is empty after tokenization.", code="empty_prompt")
    if len(prompt_ids) + max_new_tokens > context_length:
        raise ContextLengthExceeded(
            f"The prompt has {len(prompt_ids)} tokens and max_new_tokens is {max_new_tokens}: "
            f"together more than the model's context of {context_length} tokens. Shorten the "
            "prompt or lower max_new_tokens.",
            detail={"prompt_tokens": len(prompt_ids), "context_length": context_length},
        )
