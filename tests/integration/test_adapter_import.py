"""Bring-your-own adapters on the live service: download a trained adapter, import it again,
generate with it; every refused archive leaves nothing behind; residency and usage; isolation.

The archive-safety limits that need a small byte cap or member cap run in-process at the end.
"""

from __future__ import annotations

import gzip
import io
import json
import stat
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save

from tests.fixtures.env import MODEL_CACHE
from tests.fixtures.service import Service, auth, create_api_key

Files = dict[str, bytes]


# --- archives ----------------------------------------------------------------------------------


def _tar_info(name: str, size: int = 0, **fields: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def tar_gz(
    files: Files, *, folder: str | None = None, extra: Sequence[tarfile.TarInfo] = ()
) -> bytes:
    """files (under folder/ if given), then the extra members (their data: zeros)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            path = f"{folder}/{name}" if folder else name
            archive.addfile(_tar_info(path, len(data)), io.BytesIO(data))
        for info in extra:
            archive.addfile(info, io.BytesIO(bytes(info.size)) if info.isreg() else None)
    return buffer.getvalue()


def zip_bytes(files: Files, *, extra: Sequence[zipfile.ZipInfo] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        for info in extra:
            archive.writestr(info, b"/etc/passwd")
    return buffer.getvalue()


def zip_declaring(files: Files, name: str, declared: int) -> bytes:
    """A zip whose member `name` claims `declared` bytes unpacked (a bomb's header)."""
    data = bytearray(zip_bytes(files))
    directory = data.find(b"PK\x01\x02")
    while directory >= 0:
        name_length = int.from_bytes(data[directory + 28 : directory + 30], "little")
        if data[directory + 46 : directory + 46 + name_length].decode() == name:
            data[directory + 24 : directory + 28] = declared.to_bytes(4, "little")
        directory = data.find(b"PK\x01\x02", directory + 4)
    return bytes(data)


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({name: tensor.contiguous() for name, tensor in tensors.items()})


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(service: Service, tiny_model: str) -> dict[str, Any]:
    job = service.trained_job(tiny_model)
    return dict(service.client.get(f"/adapters/{job['adapter']['id']}").json())


@pytest.fixture(scope="module")
def downloaded(service: Service, trained: dict[str, Any]) -> bytes:
    answer = service.client.get(f"/adapters/{trained['id']}/download")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/gzip"
    disposition = answer.headers["content-disposition"]
    assert disposition == f'attachment; filename="{trained["id"]}.tar.gz"'
    return answer.content


@pytest.fixture(scope="module")
def adapter_files(downloaded: bytes, trained: dict[str, Any]) -> Files:
    with tarfile.open(fileobj=io.BytesIO(downloaded), mode="r:gz") as archive:
        folder = trained["id"]
        names = sorted(archive.getnames())
        assert names == [
            folder,
            f"{folder}/README.md",
            f"{folder}/adapter_config.json",
            f"{folder}/adapter_model.safetensors",
            f"{folder}/tuneserve_manifest.json",
        ]
        return {
            name.split("/", 1)[1]: archive.extractfile(name).read()  # type: ignore[union-attr]
            for name in names
            if "/" in name
        }


def _stored_dir(adapter_id: str) -> Path:
    from app.adapters.models import Adapter
    from app.db import unit_of_work
    from app.settings import get_settings
    from app.storage import artifact_store

    with unit_of_work() as session:
        key = session.get(Adapter, adapter_id).path  # type: ignore[union-attr]
    path = artifact_store(get_settings()).local_path(key)
    assert path is not None
    return path


def _generate(service: Service, adapter: str) -> str:
    answer = service.client.post(
        "/generate", json={"adapter": adapter, "prompt": "1+1=", "max_new_tokens": 4}
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["text"])


def _upload(service: Service, archive: bytes, filename: str, **form: str) -> Any:
    data = {"base_model": "tiny-llama", **form}
    return service.client.post(
        "/adapters", files={"file": (filename, archive)}, data=data, timeout=120
    )


# --- download, re-import, generate -------------------------------------------------------------


def test_download_loads_with_peft(
    downloaded: bytes, trained: dict[str, Any], tiny_model: str, tmp_path: Path
) -> None:
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    with tarfile.open(fileobj=io.BytesIO(downloaded), mode="r:gz") as archive:
        archive.extractall(tmp_path, filter="data")
    base = AutoModelForCausalLM.from_pretrained(MODEL_CACHE / tiny_model)
    model = PeftModel.from_pretrained(base, tmp_path / trained["id"])
    loaded = get_peft_model_state_dict(model)
    stored = load_file(_stored_dir(trained["id"]) / "adapter_model.safetensors")
    assert set(loaded) == set(stored) and stored
    for name, tensor in stored.items():
        assert torch.equal(loaded[name], tensor), name
    assert any(tensor.abs().sum() > 0 for name, tensor in stored.items() if "lora_B" in name)


def test_a_downloaded_adapter_imports_again_and_generates_the_same(
    service: Service, trained: dict[str, Any], downloaded: bytes
) -> None:
    answer = _upload(service, downloaded, f"{trained['id']}.tar.gz", name="copy")
    assert answer.status_code == 201, answer.text
    imported = answer.json()
    assert imported["id"] != trained["id"] and imported["id"].startswith("adapter-")
    assert imported["object"] == "adapter"
    assert imported["sha256"] == trained["sha256"]
    assert imported["rank"] == trained["rank"] and imported["base_model"] == "tiny-llama"
    assert imported["job_id"] is None
    assert imported["name"] == f"ft:tiny-llama:local:copy:{imported['id']}"
    assert imported["loaded"] is False and imported["request_count"] == 0
    assert imported["last_used_at"] is None
    stored = sorted(path.name for path in _stored_dir(imported["id"]).iterdir())
    assert stored == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

    assert _generate(service, imported["id"]) == _generate(service, trained["id"])

    # Residency: the generation loaded it in the api's engine.
    shown = service.client.get(f"/adapters/{imported['id']}").json()
    assert shown["loaded"] is True
    listed = {a["id"]: a for a in service.client.get("/adapters").json()["data"]}
    assert listed[imported["id"]]["loaded"] is True

    # Usage: record_adapter_use counts a generation (the generation path calls it).
    from app.adapters.repository import record_adapter_use

    before = shown["request_count"]
    record_adapter_use(imported["id"])
    record_adapter_use("ftckpt-0123456789abcdef01234567")  # checkpoints: nothing to count
    record_adapter_use("adapter-does-not-exist")
    used = service.client.get(f"/adapters/{imported['id']}").json()
    assert used["request_count"] == before + 1
    assert used["last_used_at"] is not None and used["last_used_at"] >= used["created_at"]

    # The import is a zip too, and the files may sit at the archive's root.
    flat = {name: data for name, data in tarfile_files(downloaded).items() if name != "README.md"}
    answer = _upload(service, zip_bytes({**flat, "tokenizer.json": b"{}"}), "flat.zip")
    assert answer.status_code == 201, answer.text
    assert answer.json()["sha256"] == trained["sha256"]
    assert answer.json()["name"].startswith("ft:tiny-llama:local:import:")
    stored = sorted(path.name for path in _stored_dir(answer.json()["id"]).iterdir())
    assert stored == ["adapter_config.json", "adapter_model.safetensors"]


def tarfile_files(archive: bytes) -> Files:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as opened:
        return {
            member.name.split("/", 1)[1]: opened.extractfile(member).read()  # type: ignore[union-attr]
            for member in opened.getmembers()
            if member.isfile()
        }


# --- refusals ----------------------------------------------------------------------------------


def _weights(files: Files) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return dict(load(files["adapter_model.safetensors"]))


def _with_config(files: Files, **changes: Any) -> Files:
    config = json.loads(files["adapter_config.json"])
    return {**files, "adapter_config.json": json.dumps({**config, **changes}).encode()}


def _wrong_shape(files: Files) -> tuple[str, bytes]:
    weights = _weights(files)
    name = sorted(n for n in weights if n.endswith("q_proj.lora_A.weight"))[0]
    rank, in_features = weights[name].shape
    weights[name] = torch.zeros(rank, in_features + 1)
    return "shape.tar.gz", tar_gz(
        {**files, "adapter_model.safetensors": safetensors_bytes(weights)}
    )


def _unknown_module(files: Files) -> tuple[str, bytes]:
    weights = {
        name.replace("layers.1.", "layers.7."): tensor for name, tensor in _weights(files).items()
    }
    return "module.tar.gz", tar_gz(
        {**files, "adapter_model.safetensors": safetensors_bytes(weights)}
    )


def _bomb_tar(files: Files) -> tuple[str, bytes]:
    # A header declaring 2 GiB, with no data behind it: refused before anything is read.
    header = _tar_info("adapter_model.safetensors", 2**31).tobuf(format=tarfile.PAX_FORMAT)
    config = files["adapter_config.json"]
    first = _tar_info("adapter_config.json", len(config)).tobuf() + config
    first += bytes(-len(config) % 512)
    return "bomb.tar.gz", gzip.compress(first + header + bytes(1024))


def _zip_symlink(files: Files) -> tuple[str, bytes]:
    link = zipfile.ZipInfo("README.md")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    readme_free = {name: data for name, data in files.items() if name != "README.md"}
    return "link.zip", zip_bytes(readme_free, extra=[link])


Case = Callable[[Files], tuple[str, bytes]]
REFUSALS: list[tuple[str, Case, str]] = [
    (
        "pickle",
        lambda f: ("p.tar.gz", tar_gz({**f, "training_args.bin": b"\x80\x04K\x01."})),
        "adapter_not_safetensors",
    ),
    (
        "pickle_weights",
        lambda f: (
            "p.zip",
            zip_bytes(
                {
                    "adapter_config.json": f["adapter_config.json"],
                    "adapter_model.bin": b"\x80\x04K\x01.",
                }
            ),
        ),
        "adapter_not_safetensors",
    ),
    ("wrong_shape", _wrong_shape, "adapter_shape_mismatch"),
    ("unknown_module", _unknown_module, "adapter_module_mismatch"),
    (
        "missing_config",
        lambda f: (
            "m.tar.gz",
            tar_gz({"adapter_model.safetensors": f["adapter_model.safetensors"]}),
        ),
        "adapter_files_missing",
    ),
    (
        # DoRA imports (tests/integration/test_lora_variants.py), but with its magnitudes.
        "dora_without_magnitudes",
        lambda f: ("d.tar.gz", tar_gz(_with_config(f, use_dora=True))),
        "adapter_weights_invalid",
    ),
    (
        "not_lora",
        lambda f: ("ia3.tar.gz", tar_gz(_with_config(f, peft_type="IA3"))),
        "adapter_not_lora",
    ),
    (
        "broken_config",
        lambda f: ("c.tar.gz", tar_gz({**f, "adapter_config.json": b"{not json"})),
        "adapter_config_invalid",
    ),
    (
        "traversal",
        lambda f: ("t.tar.gz", tar_gz(f, extra=[_tar_info("../evil")])),
        "adapter_archive_unsafe",
    ),
    (
        "absolute_path",
        lambda f: ("a.zip", zip_bytes({**f, "/etc/cron.d/evil": b"x"})),
        "adapter_archive_unsafe",
    ),
    (
        "tar_symlink",
        lambda f: (
            "s.tar.gz",
            tar_gz(
                {k: v for k, v in f.items() if k != "README.md"},
                extra=[_tar_info("README.md", type=tarfile.SYMTYPE, linkname="/etc/passwd")],
            ),
        ),
        "adapter_archive_unsafe",
    ),
    ("zip_symlink", _zip_symlink, "adapter_archive_unsafe"),
    (
        "not_an_archive",
        lambda f: ("x.tar.gz", b"certainly not an archive\n"),
        "adapter_archive_invalid",
    ),
    (
        "zip_bomb",
        lambda f: ("b.zip", zip_declaring(f, "adapter_model.safetensors", 0xF0000000)),
        "adapter_archive_too_large",
    ),
    ("tar_bomb", _bomb_tar, "adapter_archive_too_large"),
    (
        "unexpected_file",
        lambda f: ("u.tar.gz", tar_gz({**f, "run.sh": b"#!/bin/sh\n"})),
        "adapter_unexpected_file",
    ),
]


def _leftovers() -> tuple[int, set[str], set[str]]:
    """Adapter rows, entries under artifacts/adapters/, and import workspaces in the data dir."""
    from sqlalchemy import func, select

    from app.adapters.models import Adapter
    from app.db import unit_of_work
    from app.settings import get_settings

    settings = get_settings()
    with unit_of_work() as session:
        rows = session.scalar(select(func.count()).select_from(Adapter)) or 0
    adapters = settings.artifacts_dir / "adapters"
    stored = {path.name for path in adapters.iterdir()} if adapters.is_dir() else set()
    workspaces = {path.name for path in settings.data_dir.glob(".adapter-import-*")}
    return rows, stored, workspaces


@pytest.mark.parametrize(
    ("case", "expected"), [(c, e) for _, c, e in REFUSALS], ids=[i for i, _, _ in REFUSALS]
)
def test_refused_archives_leave_nothing_behind(
    service: Service, adapter_files: Files, case: Case, expected: str
) -> None:
    before = _leftovers()
    filename, archive = case(adapter_files)
    answer = _upload(service, archive, filename)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == expected, error
    assert error["message"]
    assert _leftovers() == before


def test_refusals_name_the_tensor_and_the_file(service: Service, adapter_files: Files) -> None:
    filename, archive = _wrong_shape(adapter_files)
    error = _upload(service, archive, filename).json()["error"]
    tensor = error["detail"]["tensor"]
    assert tensor.startswith("base_model.model.model.layers.") and tensor.endswith("lora_A.weight")
    assert tensor in error["message"]
    rank = json.loads(adapter_files["adapter_config.json"])["r"]
    assert error["detail"]["shape"] == [rank, 65] and error["detail"]["expected"] == [rank, 64]
    assert f"[{rank}, 65]" in error["message"] and f"[{rank}, 64]" in error["message"]

    filename, archive = _unknown_module(adapter_files)
    error = _upload(service, archive, filename).json()["error"]
    assert "model.layers.7." in error["message"] and error["detail"]["module"].startswith(
        "model.layers.7."
    )

    pickle = tar_gz({**adapter_files, "optimizer.pt": b"\x80\x04."})
    error = _upload(service, pickle, "p.tar.gz").json()["error"]
    assert (
        "optimizer.pt" in error["message"] and "pickle files are never loaded" in error["message"]
    )
    assert error["detail"] == {"file": "optimizer.pt"}


def test_unknown_base_model_and_bad_label_are_refused(
    service: Service, adapter_files: Files
) -> None:
    before = _leftovers()
    answer = _upload(service, tar_gz(adapter_files), "a.tar.gz", base_model="no-such-model")
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "unknown_base_model"
    answer = _upload(service, tar_gz(adapter_files), "a.tar.gz", name="not a label!")
    assert answer.status_code == 422, answer.text
    assert _leftovers() == before


def test_url_import_refuses_private_addresses(service: Service) -> None:
    before = _leftovers()
    answer = service.client.post(
        "/adapters/import",
        json={"url": "http://127.0.0.1:1/x.tar.gz", "base_model": "tiny-llama"},
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "adapter_url_forbidden", error
    assert "127.0.0.1" in error["message"] and "loopback" in error["message"]
    answer = service.client.post(
        "/adapters/import", json={"url": "file:///etc/passwd", "base_model": "tiny-llama"}
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "adapter_url_invalid"
    answer = service.client.post(
        "/adapters/import",
        json={"url": "http://127.0.0.1:1/x.tar.gz", "base_model": "nope"},
    )
    assert answer.json()["error"]["code"] == "unknown_base_model"
    assert _leftovers() == before


# --- owners and deletion -----------------------------------------------------------------------


def test_another_owner_gets_404_and_the_owner_deletes(service: Service, downloaded: bytes) -> None:
    imported = _upload(service, downloaded, "mine.tar.gz").json()
    adapter_id = imported["id"]
    stored = _stored_dir(adapter_id)
    assert stored.is_dir()

    other = auth(create_api_key("eve-adapters"))
    for method, path in (
        ("GET", f"/adapters/{adapter_id}"),
        ("GET", f"/adapters/{adapter_id}/download"),
        ("DELETE", f"/adapters/{adapter_id}"),
    ):
        answer = service.client.request(method, path, headers=other)
        assert answer.status_code == 404, (method, path, answer.text)
        assert answer.json()["error"]["code"] == "adapter_not_found"
    assert service.client.get(f"/adapters/{adapter_id}").status_code == 200

    answer = service.client.delete(f"/adapters/{adapter_id}")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"id": adapter_id, "object": "adapter", "deleted": True}
    assert not stored.exists()
    for method, path in (
        ("GET", f"/adapters/{adapter_id}"),
        ("GET", f"/adapters/{adapter_id}/download"),
        ("DELETE", f"/adapters/{adapter_id}"),
    ):
        answer = service.client.request(method, path)
        assert answer.status_code == 404, (method, path, answer.text)
    gone = service.client.post(
        "/generate", json={"adapter": adapter_id, "prompt": "1+1=", "max_new_tokens": 2}
    )
    assert gone.status_code == 404


# --- archive limits, in-process ----------------------------------------------------------------


def _unpack(archive: bytes, tmp_path: Path, max_bytes: int = 10**9) -> Any:
    from app.adapters.unpacking import unpack_adapter

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "archive"
    path.write_bytes(archive)
    dest = tmp_path / "out"
    dest.mkdir()
    return unpack_adapter(path, dest, max_bytes=max_bytes)


def _refusal_code(archive: bytes, tmp_path: Path, max_bytes: int = 10**9) -> str:
    from app.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as refused:
        _unpack(archive, tmp_path, max_bytes)
    return refused.value.code


ZEROS = bytes(4 * 1024 * 1024)
SMALL = {"adapter_config.json": b"{}", "adapter_model.safetensors": ZEROS}


def test_real_bombs_stop_at_the_byte_cap(tmp_path: Path) -> None:
    # 4 MiB of zeros compress to a few KiB; the cap is 1 MiB.
    assert len(zip_bytes(SMALL)) < 64 * 1024
    assert _refusal_code(zip_bytes(SMALL), tmp_path / "zip", 2**20) == "adapter_archive_too_large"
    assert _refusal_code(tar_gz(SMALL), tmp_path / "tar", 2**20) == "adapter_archive_too_large"
    assert _unpack(tar_gz(SMALL, folder="x"), tmp_path / "ok", 8 * 2**20).size_bytes == 2 + len(
        ZEROS
    )


def test_a_pax_header_bomb_is_refused(tmp_path: Path) -> None:
    pax = _tar_info("pax", 8 * 2**20, type=tarfile.XHDTYPE).tobuf(format=tarfile.USTAR_FORMAT)
    archive = gzip.compress(pax + bytes(8 * 2**20) + bytes(1024))
    assert _refusal_code(archive, tmp_path) == "adapter_archive_too_large"


def test_member_count_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.adapters import unpacking

    monkeypatch.setattr(unpacking, "MAX_MEMBERS", 3)
    many = {**SMALL, "a.txt": b"", "b.txt": b""}
    assert _refusal_code(zip_bytes(many), tmp_path / "zip") == "adapter_archive_too_large"
    assert _refusal_code(tar_gz(many), tmp_path / "tar") == "adapter_archive_too_large"


def test_a_duplicate_member_is_refused(tmp_path: Path) -> None:
    twice = _tar_info("adapter_config.json", 2)
    archive = tar_gz(SMALL, extra=[twice])
    assert _refusal_code(archive, tmp_path) == "adapter_archive_unsafe"


def test_layer_shapes_come_from_the_config_alone(default_model_dir: Path, tiny_model: str) -> None:
    from app.adapters.validation import linear_shapes
    from app.base_models.registry import get_base_model
    from app.settings import get_settings

    settings = get_settings()
    tiny = linear_shapes(settings, get_base_model(settings, tiny_model))
    assert tiny["model.layers.1.self_attn.k_proj"] == (64, 32)  # 2 key-value heads of 16
    # Seven adapted layers per block; the LM head is not adapted (as with PEFT's "all-linear").
    assert tiny["model.layers.0.mlp.down_proj"] == (128, 64) and len(tiny) == 2 * 7
    default = linear_shapes(settings, get_base_model(settings, None))
    assert default["model.layers.29.self_attn.q_proj"] == (576, 576)
    assert default["model.layers.0.mlp.up_proj"] == (576, 1536) and len(default) == 30 * 7
    assert "lm_head" not in default
