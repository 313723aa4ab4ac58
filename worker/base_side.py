"""The base model's side of a job's evaluation, kept on disk: its loss on the scored rows, its
greedy answers to the sample prompts and, on preference rows, its preference accuracy.

They depend only on the base model and the rows, not on the adapter, so jobs that score the
same rows on the same base model (a sweep of hyperparameters over one dataset, a job run again)
compute them once: the next job scores its adapter alone and decodes only the adapter's
answers. The key holds everything they depend on: the base model (its weight files' names,
sizes and times, or the Hub commit it came from), the precision and device the evaluation runs
at, the token ids of every scored row and prompt, and how many tokens an answer may take. A
base model whose weights cannot be named that way (a Hub model without a resolved commit) is
not kept.

One small JSON file per key under `TUNESERVE_DATA_DIR/evaluations/base`, written whole (a
temporary file renamed) so that two workers sharing the directory never read half of one;
deleting the directory only makes the next evaluations compute them again. At most `KEEP`
files stay: a file read is marked as just used, and writing one past the limit deletes the
least recently used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Bump when what a base side holds, or how worker/evaluation.py computes it, changes.
VERSION = 1
# Base sides kept at most (a few KB each): enough for every validation set of a busy service.
KEEP = 500


@dataclass(frozen=True)
class BaseSide:
    loss: float
    answers: list[str]
    preference_accuracy: float | None = None


def base_model_identity(model: Any) -> str | None:
    """What names the base model's weights: the Hub commit it was loaded from, or its local
    directory with each weight file's name, size and modification time; None when neither."""
    config = model.config
    location = str(getattr(config, "_name_or_path", "") or "")
    commit = getattr(config, "_commit_hash", None)
    if commit:
        return f"{location}@{commit}"
    directory = Path(location)
    weights = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not weights:
        return None
    stats = [(path.name, path.stat()) for path in weights]
    files = [(name, stat.st_size, stat.st_mtime_ns) for name, stat in stats]
    return json.dumps([str(directory.resolve()), files])


class BaseSides:
    """The kept base sides under `directory`."""

    def __init__(self, directory: Path, keep: int = KEEP) -> None:
        self.directory = directory
        self.keep = keep

    def key(self, model: Any, rows: Any) -> str | None:
        """The key of model's base side on `rows` (JSON-able: token ids and settings), or None
        when the base model cannot be named."""
        import torch

        identity = base_model_identity(model)
        if identity is None:
            return None
        parameter = next(model.parameters())
        material = [
            VERSION,
            identity,
            torch.__version__,
            parameter.device.type,
            str(parameter.dtype),
            rows,
        ]
        return hashlib.sha256(json.dumps(material).encode()).hexdigest()

    def get(self, key: str) -> BaseSide | None:
        path = self.directory / f"{key}.json"
        try:
            side = BaseSide(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:  # unreadable: computed again
            logger.warning("ignoring the kept base side %s: %s", path, exc)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # just used: the last to be pruned
        return side

    def put(self, key: str, side: BaseSide) -> None:
        temporary: str | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(handle, "w") as file:
                json.dump(asdict(side), file)
            os.replace(temporary, self.directory / f"{key}.json")
            self._prune()
        except OSError as exc:  # the evaluation stands; the next one computes it again
            logger.warning("could not keep the base side in %s: %s", self.directory, exc)
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)

    def _prune(self) -> None:
        """Delete the least recently used files beyond `keep`."""
        stats = []
        for path in self.directory.glob("*.json"):
            try:
                stats.append((path.stat().st_mtime_ns, path))
            except FileNotFoundError:  # pruned by another worker meanwhile
                continue
        for _used, path in sorted(stats)[: max(len(stats) - self.keep, 0)]:
            path.unlink(missing_ok=True)
