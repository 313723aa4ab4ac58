"""The device here: ROCm or CUDA GPUs, or the CPU, and whether bf16 pays there (what a worker
trains on, and what the api serves on)."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Device:
    kind: str  # "rocm", "cuda" or "cpu"
    name: str
    count: int
    bf16: bool  # the hardware runs bf16 natively
    memory_bytes: int | None
    torch: str
    runtime: str | None  # HIP or CUDA version

    @property
    def accelerator_class(self) -> str:
        """The queue family this worker serves: `rocm`, `cuda` or `cpu`."""
        return self.kind

    def facts(self) -> dict[str, Any]:
        return asdict(self)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache
def detect_device() -> Device:
    import os

    import torch

    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        hip = getattr(torch.version, "hip", None)
        return Device(
            kind="rocm" if hip else "cuda",
            name=properties.name,
            count=torch.cuda.device_count(),
            bf16=bool(torch.cuda.is_bf16_supported()),
            memory_bytes=int(properties.total_memory),
            torch=torch.__version__,
            runtime=hip or torch.version.cuda,
        )
    return Device(
        kind="cpu",
        name=_cpu_name(),
        count=1,
        bf16=bool(set(CPU_BF16_FLAGS) & _cpu_flags()),
        memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        torch=torch.__version__,
        runtime=None,
    )
