"""Small pure functions: stop sequences, step counts, file names, the base-model registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.base_models.registry import (
    ModelsFileError,
    ModelSource,
    UnknownBaseModel,
    get_base_model,
    list_base_models,
)
from app.files.service import safe_filename
from app.jobs.steps import total_steps
from app.settings import Settings


@pytest.mark.parametrize(
    ("rows", "batch", "accumulation", "epochs", "steps"),
    [(16, 4, 1, 2, 8), (17, 4, 1, 1, 5), (17, 4, 2, 1, 3), (1, 8, 1, 3, 3), (300, 8, 1, 2, 76)],
)
def test_total_steps_matches_the_trainer(rows, batch, accumulation, epochs, steps) -> None:
    hyperparameters = {
        "batch_size": batch,
        "gradient_accumulation_steps": accumulation,
        "n_epochs": epochs,
    }
    assert total_steps(rows, hyperparameters) == steps


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("train.jsonl", "train.jsonl"),
        ("../../etc/passwd", "passwd"),
        ("C:\\data\\my file.csv", "my_file.csv"),
        ("", "upload"),
        (None, "upload"),
        ("..", "upload"),
        ("données 2024.json.gz", "donn_es_2024.json.gz"),
    ],
)
def test_safe_filename_never_makes_a_path(name, expected) -> None:
    assert safe_filename(name) == expected


def test_registry_has_the_default_and_operator_models(tmp_path: Path) -> None:
    models_file = tmp_path / "models.toml"
    models_file.write_text(
        '[models.llama-2-7b-chat]\nhf_id = "meta-llama/Llama-2-7b-chat-hf"\nrevision = "main"\n'
        f'[models.local-one]\npath = "{tmp_path}"\n'
    )
    settings = Settings(models_file=models_file, data_dir=tmp_path)
    names = [model.name for model in list_base_models(settings)]
    assert names == ["smollm2-135m-instruct", "llama-2-7b-chat", "local-one"]
    assert get_base_model(settings, None).source is ModelSource.PACKAGE_GGUF
    llama = get_base_model(settings, "llama-2-7b-chat")
    assert llama.source is ModelSource.HUGGING_FACE and llama.revision == "main"
    with pytest.raises(UnknownBaseModel) as raised:
        get_base_model(settings, "gpt-5")
    assert "llama-2-7b-chat" in raised.value.message and raised.value.status_code == 400


@pytest.mark.parametrize(
    "content",
    ["[models.x]\nrevision = 'main'\n", "[models\n", '[models."bad name!"]\npath = "/x"\n'],
)
def test_a_broken_models_file_is_reported(tmp_path: Path, content: str) -> None:
    models_file = tmp_path / "models.toml"
    models_file.write_text(content)
    with pytest.raises(ModelsFileError) as raised:
        list_base_models(Settings(models_file=models_file, data_dir=tmp_path))
    assert str(models_file) in raised.value.message


def test_settings_default_to_files_in_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=None, broker_url=None, model_cache_dir=None)
    assert settings.sqlalchemy_url == f"sqlite:///{tmp_path}/tuneserve.sqlite"
    assert settings.celery_broker_url == f"sqla+sqlite:///{tmp_path}/broker.sqlite"
    assert settings.model_cache_path == tmp_path / "models"
    assert Settings(data_dir=Path("~/x")).data_dir == Path.home() / "x"
