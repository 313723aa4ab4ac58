"""`serving` in the models file: which engine generates with a base model, checked on read."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.base_models.registry import (
    ModelsFileError,
    ModelSource,
    Serving,
    get_base_model,
    list_base_models,
)
from app.settings import DEFAULT_BASE_MODEL, Settings


def models(tmp_path: Path, content: str) -> Settings:
    models_file = tmp_path / "models.toml"
    models_file.write_text(content)
    return Settings(models_file=models_file, data_dir=tmp_path)


def test_builtin_is_the_default_and_vllm_needs_its_server(tmp_path: Path) -> None:
    settings = models(
        tmp_path,
        f'[models.local]\npath = "{tmp_path}"\n'
        '[models.big]\nhf_id = "org/big"\nserving = "vllm"\n'
        'vllm_url = "http://vllm:8000/v1/"\nvllm_model = "org/big"\n',
    )
    local = get_base_model(settings, "local")
    assert local.serving is Serving.BUILTIN and local.vllm_url is None
    big = get_base_model(settings, "big")
    assert big.serving is Serving.VLLM
    assert big.vllm_url == "http://vllm:8000"  # the root: no trailing / or /v1
    assert big.vllm_model == "org/big"
    assert get_base_model(settings, None).serving is Serving.BUILTIN


def test_the_builtin_model_can_be_served_by_vllm_without_repeating_its_source(
    tmp_path: Path,
) -> None:
    settings = models(
        tmp_path,
        f'[models.{DEFAULT_BASE_MODEL}]\nserving = "vllm"\nvllm_url = "http://127.0.0.1:8001"\n',
    )
    default = get_base_model(settings, None)
    assert default.source is ModelSource.PACKAGE_GGUF
    assert default.serving is Serving.VLLM and default.vllm_url == "http://127.0.0.1:8001"
    assert "SmolLM2" in default.description
    assert [model.name for model in list_base_models(settings)] == [DEFAULT_BASE_MODEL]


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ('serving = "triton"', 'use "builtin" or "vllm"'),
        ('serving = "vllm"', "needs vllm_url"),
        ('serving = "vllm"\nvllm_url = "vllm:8000"', "is not an http(s) URL"),
        ('serving = "vllm"\nvllm_url = "ftp://vllm"', "is not an http(s) URL"),
        ('serving = "vllm"\nvllm_url = "http://vllm:port"', "vllm_url"),
        ('serving = "vllm"\nvllm_url = "http://vllm:8000"\nvllm_model = ""', "vllm_model"),
        ('vllm_url = "http://vllm:8000"', 'are for serving = "vllm"'),
        ('serve = "vllm"', "unknown key 'serve'"),
    ],
)
def test_a_wrong_serving_entry_is_reported(tmp_path: Path, entry: str, says: str) -> None:
    settings = models(tmp_path, f'[models.m]\npath = "{tmp_path}"\n{entry}\n')
    with pytest.raises(ModelsFileError) as raised:
        list_base_models(settings)
    assert says in raised.value.message
    assert "[models.m]" in raised.value.message


# --- the compose stack: the api generates with the `vllm` service ---------------------------------


def test_compose_points_the_default_model_at_its_vllm_service() -> None:
    import yaml

    repo = Path(__file__).resolve().parents[2]
    compose = yaml.safe_load((repo / "docker-compose.yml").read_text())
    services = compose["services"]
    api_env = services["api"]["environment"]
    mounted = {volume.split(":")[1]: volume.split(":")[0] for volume in services["api"]["volumes"]}
    models_file = repo / mounted[api_env["TUNESERVE_MODELS_FILE"]]
    default = get_base_model(Settings(models_file=models_file), None)
    assert default.serving is Serving.VLLM and default.vllm_url == "http://vllm:8000"
    assert services["worker"]["environment"]["TUNESERVE_MODELS_FILE"] == str(
        api_env["TUNESERVE_MODELS_FILE"]
    )

    vllm = services["vllm"]
    assert vllm["image"].startswith("rocm/vllm:") and not vllm["image"].endswith(":latest")
    args = vllm["command"]
    assert "--enable-lora" in args
    assert args[args.index("--port") + 1] == "8000"
    assert args[args.index("--max-loras") + 1] == api_env["TUNESERVE_VLLM_MAX_LORAS"]
    assert args[args.index("--served-model-name") + 1] == DEFAULT_BASE_MODEL
    assert args[0] == f"{api_env['TUNESERVE_MODEL_CACHE_DIR']}/{DEFAULT_BASE_MODEL}"
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "ports" not in vllm  # only the api talks to it
    # Adapters are loaded by path: vLLM sees the artifacts and models volumes where the api does.
    vllm_mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in vllm["volumes"]}
    assert vllm_mounts["/data"] == mounted["/data"] == "artifacts"
    assert vllm_mounts["/models"] == mounted["/models"] == "models"
    prepare = services["prepare-model"]
    assert vllm["depends_on"] == {"prepare-model": {"condition": "service_completed_successfully"}}
    assert "model_location" in " ".join(prepare["command"])
