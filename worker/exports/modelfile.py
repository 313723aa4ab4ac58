"""An Ollama Modelfile for an exported GGUF file.

Ollama formats chats with a Go template of its own, not the model's Jinja chat template. The
common ChatML form (`<|im_start|>role ... <|im_end|>`, as SmolLM2 and Qwen use) is translated;
for any other template the Modelfile has no TEMPLATE, and Ollama falls back to the template
stored in the GGUF file (tokenizer.chat_template), which it matches against the ones it knows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

# ChatML as an Ollama template: the same text the Jinja template renders, message by message,
# ending with the assistant's turn opened.
CHATML_TEMPLATE = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ range .Messages }}"
    '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n<|im_start|>assistant\n'
    '{{ else if eq .Role "assistant" }}{{ .Content }}<|im_end|>\n{{ end }}'
    "{{ end }}"
)
CHATML_STOP = "<|im_end|>"
# The system prompt a ChatML template writes when the chat has none (SmolLM2: "You are a
# helpful AI assistant named SmolLM, ..."); the newline may be literal or escaped in the Jinja.
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]+?)<\|im_end\|>")


def is_chatml(chat_template: str) -> bool:
    return all(marker in chat_template for marker in ("<|im_start|>", "<|im_end|>"))


def ollama_modelfile(
    gguf_name: str,
    chat_template: str | None,
    stop_tokens: Iterable[str] = (),
    *,
    system_prompt: str | None = None,
    parameters: Mapping[str, float | int | str] | None = None,
) -> str:
    """The Modelfile text: FROM ./<gguf_name>, a TEMPLATE when the chat template is ChatML,
    the template's default system prompt (or `system_prompt`), and PARAMETER lines (each stop
    token, then `parameters`, e.g. {"temperature": 0.2, "num_ctx": 4096})."""
    lines = [f"FROM ./{gguf_name}", ""]
    stops = list(dict.fromkeys(stop_tokens))
    if chat_template and is_chatml(chat_template):
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
        default_system = _DEFAULT_SYSTEM.search(chat_template)
        if system_prompt is None and default_system is not None:
            system_prompt = default_system.group(1)
        if CHATML_STOP not in stops:
            stops.insert(0, CHATML_STOP)
    elif chat_template:
        lines.append(
            "# No TEMPLATE: the chat template is not ChatML; Ollama uses the one in the GGUF file."
        )
    else:
        lines.append(
            "# No TEMPLATE: the model has no chat template; Ollama sends prompts as they are."
        )
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    lines.append("")
    lines.extend(f"PARAMETER stop {json.dumps(stop)}" for stop in stops)
    lines.extend(f"PARAMETER {key} {value}" for key, value in (parameters or {}).items())
    return "\n".join(lines).rstrip("\n") + "\n"


def ollama_modelfile_for(model_dir: Path, gguf_name: str) -> str:
    """The Modelfile for a merged model folder: its chat template, and its end-of-sequence
    tokens (from generation_config.json, else config.json) as stop tokens."""
    from tokenizers import Tokenizer

    chat_template = _chat_template(model_dir)
    vocabulary = Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab(
        with_added_tokens=True
    )
    names = {index: token for token, index in vocabulary.items()}
    eos: int | list[int] | None = None
    for file in ("generation_config.json", "config.json"):
        if eos is None and (model_dir / file).is_file():
            eos = json.loads((model_dir / file).read_text()).get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    stops = [names[index] for index in eos_ids if index in names]
    return ollama_modelfile(gguf_name, chat_template, stops)


def _chat_template(model_dir: Path) -> str | None:
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text()
    for file in ("chat_template.json", "tokenizer_config.json"):
        if (model_dir / file).is_file():
            template = json.loads((model_dir / file).read_text()).get("chat_template")
            if isinstance(template, str):
                return template
    return None
