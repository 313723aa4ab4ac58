"""The worker's warm-up imports, while it waits for its first job, what that job would import on
its way to the first training step: the training libraries, the worker's own modules, and PEFT's
bitsandbytes layers (which PEFT imports on the first LoRA model it builds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

WARM_UP = """
import sys
from worker import celery_app

before = {name: name in sys.modules for name in NAMES}
celery_app._warming_up.acquire()  # as the worker_ready signal does
celery_app._import_training_stack()
print(before)
print({name: name in sys.modules for name in NAMES})
print(celery_app._warming_up.acquire(blocking=False))  # released for the first job
"""
NAMES = ["trl", "worker.runner", "bitsandbytes", "peft.tuners.lora.bnb"]


def test_the_warm_up_imports_what_the_first_job_would(tmp_path: Path) -> None:
    env = {**os.environ, "TUNESERVE_DATA_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    found = subprocess.run(
        [sys.executable, "-c", f"NAMES = {NAMES!r}\n{WARM_UP}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert found.returncode == 0, found.stderr
    before, after, released = found.stdout.splitlines()[-3:]
    assert before == repr(dict.fromkeys(NAMES, False))
    assert after == repr(dict.fromkeys(NAMES, True))
    assert released == "True"
