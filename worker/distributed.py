"""Data-parallel (DDP) or fully sharded (FSDP) training on every GPU of a node (or N CPU
processes), launched by torchrun.

`run_distributed` has train_lora's contract (same result, the adapter saved once into
output_dir/adapter, the caller's hooks called in the calling process), but trains with
`processes` ranks started by PyTorch's own launcher:

    python -m torch.distributed.run --standalone --nproc_per_node N -m worker.distributed RUN_DIR

The parent writes the spec and the records as JSON into RUN_DIR (output_dir/distributed); each
rank runs `main()` -> `train_lora` on them. The Trainer (through accelerate) shards the data and
all-reduces the gradients: NCCL on GPUs, gloo on CPUs. With `spec.distributed == "fsdp"` it also
shards the model (FSDP2: each rank holds its share of every weight and of the optimizer state,
gathering one decoder layer at a time), saves sharded checkpoints (one file per rank) and resumes
from them; the adapter is gathered whole once, for rank 0 to save. Between the parent and the
ranks there are only files in RUN_DIR:

- progress.jsonl: rank 0 appends one ProgressUpdate per trainer log; the parent tails it and
  forwards each one to hooks.on_progress while the launcher runs.
- STOP: the parent creates it once hooks.should_stop() turns true. Every rank looks for it at
  each step end and the ranks all-reduce the flag (MAX), so they all stop after the same step (a
  rank stopping alone would leave the others waiting in their next collective).
- rank-<i>.json: what each rank did (world size, backend, steps, the examples and tokens its
  forward passes saw, a checksum of its LoRA weights): the proof that every rank trained.
- result.json: rank 0's TrainingResult.
- launcher.log: the launcher's and the ranks' stdout and stderr; its tail is the error message
  when the launcher exits non-zero.

The bulky records (train.json, eval.json) are removed when the run ends; the rest stays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.training import ProgressUpdate, TrainingHooks, TrainingResult, TrainingSpec, train_lora

logger = logging.getLogger(__name__)

RUN_DIR_NAME = "distributed"
STOP_FILE = "STOP"
PROGRESS_FILE = "progress.jsonl"
RESULT_FILE = "result.json"
LAUNCHER_LOG = "launcher.log"
RECORD_FILES = ("train.json", "eval.json")
ERROR_TAIL_CHARS = 4000


def node_processes() -> int:
    """One rank per visible GPU; 1 on a CPU-only node."""
    import torch

    return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1


def rank_marker(run_dir: Path, rank: int) -> Path:
    return run_dir / f"rank-{rank}.json"


def launcher_command(run_dir: Path, processes: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        "-m",
        "worker.distributed",
        str(run_dir),
    ]


def _child_env(processes: int) -> dict[str, str]:
    env = dict(os.environ)
    # A fresh rendezvous: nothing inherited from an enclosing launch.
    for key in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ):
        env.pop(key, None)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env["OMP_NUM_THREADS"] = str(max((cores or 1) // processes, 1))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_distributed(
    spec: TrainingSpec,
    train_records: list[dict[str, Any]],
    eval_records: list[dict[str, Any]] | None,
    output_dir: Path,
    hooks: TrainingHooks,
    processes: int,
    poll_interval: float = 0.5,
) -> TrainingResult:
    """Train a LoRA adapter with `processes` data-parallel ranks; see the module docstring."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    output_dir = Path(output_dir)
    run_dir = output_dir / RUN_DIR_NAME
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(
        json.dumps({"spec": spec.to_json(), "output_dir": str(output_dir)})
    )
    (run_dir / "train.json").write_text(json.dumps(train_records))
    (run_dir / "eval.json").write_text(json.dumps(eval_records))

    command = launcher_command(run_dir, processes)
    logger.info("launching %d ranks: %s", processes, " ".join(command))
    try:
        with (run_dir / LAUNCHER_LOG).open("wb") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=_child_env(processes),
                start_new_session=True,  # its own process group: stoppable as a whole
            )
            try:
                returncode = _supervise(process, run_dir, hooks, poll_interval)
            finally:
                _stop_launcher(process)
    finally:
        for name in RECORD_FILES:
            (run_dir / name).unlink(missing_ok=True)

    if returncode != 0:
        tail = _tail(run_dir / LAUNCHER_LOG, ERROR_TAIL_CHARS)
        cause = _last_exception(tail)
        raise RuntimeError(
            f"Distributed training ({processes} processes) failed: the launcher exited with "
            f"{returncode}{f' ({cause})' if cause else ''}. Last output:\n{tail}"
        )
    result_path = run_dir / RESULT_FILE
    if not result_path.is_file():
        raise RuntimeError(
            "Distributed training ended without a result from rank 0. Last output:\n"
            + _tail(run_dir / LAUNCHER_LOG, ERROR_TAIL_CHARS)
        )
    return TrainingResult(**json.loads(result_path.read_text()))


def _supervise(
    process: subprocess.Popen[bytes], run_dir: Path, hooks: TrainingHooks, poll_interval: float
) -> int:
    """Forward rank 0's progress and the caller's stop request until the launcher exits."""
    tail = _ProgressTail(run_dir / PROGRESS_FILE, hooks.on_progress)
    stop_file = run_dir / STOP_FILE
    while True:
        returncode = process.poll()
        tail.forward()
        if returncode is not None:
            return returncode
        if not stop_file.exists() and hooks.should_stop():
            logger.info("stop requested: asking every rank to stop at its next step end")
            stop_file.touch()
        time.sleep(poll_interval)


class _ProgressTail:
    """Reads the complete JSON lines appended to a file since the last call."""

    def __init__(self, path: Path, on_progress: Callable[[ProgressUpdate], None]) -> None:
        self.path = path
        self.on_progress = on_progress
        self.offset = 0
        self.partial = b""

    def forward(self) -> None:
        try:
            with self.path.open("rb") as stream:
                stream.seek(self.offset)
                chunk = stream.read()
        except FileNotFoundError:
            return
        self.offset += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        for line in lines:
            if line.strip():
                self.on_progress(ProgressUpdate(**json.loads(line)))


def _stop_launcher(process: subprocess.Popen[bytes]) -> None:
    """Make sure no rank outlives run_distributed (an exception in a hook, an interrupt)."""
    if process.poll() is not None:
        return
    logger.warning("stopping the training launcher (pid %d)", process.pid)
    process.terminate()  # torchrun forwards SIGTERM to its ranks
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


_EXCEPTION_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit))(?::.*)?$")


def _last_exception(text: str) -> str | None:
    """The last `SomeError: message` line of a traceback, the failing rank's own words."""
    for line in reversed(text.splitlines()):
        if _EXCEPTION_LINE.match(line) and not any(
            name in line for name in ("SignalException", "ChildFailedError")
        ):
            return line.strip()[:500]
    return None


def _tail(path: Path, chars: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no launcher output)"
    return text[-chars:]


# --- in each rank -------------------------------------------------------------------------------


def _rank_callback(run_dir: Path) -> Any:
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    class RankCallback(TrainerCallback):
        """Stops every rank at the same step, and records what this rank trained on."""

        def __init__(self) -> None:
            self.examples = 0
            self.tokens = 0
            self.stop_seen = False
            self.lora_checksum: float | None = None
            self.lora_b_abs_sum: float | None = None
            self.sharded = False

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: ARG002
            model = kwargs.get("model")
            if model is not None:
                model.register_forward_pre_hook(self._count, with_kwargs=True)

        def _count(self, module: Any, args: Any, kwargs: Any) -> None:
            if not module.training:
                return
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None:
                return
            mask = kwargs.get("attention_mask")
            positions = kwargs.get("position_ids")
            if mask is None and positions is not None:
                # A padding-free batch: its rows end to end in one sequence, each from 0.
                self.examples += int((positions == 0).sum())
            else:
                self.examples += int(input_ids.shape[0])
            self.tokens += int(mask.sum()) if mask is not None else int(input_ids.numel())

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:  # noqa: ARG002
            local = 1.0 if (run_dir / STOP_FILE).exists() else 0.0
            flag = torch.tensor([local], device=args.device)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0:
                self.stop_seen = True
                control.should_training_stop = True

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: ARG002
            model = kwargs.get("model")
            if model is None:
                return
            total = 0.0
            lora_b = 0.0
            # FSDP holds each parameter as a DTensor: this rank's share of it.
            self.sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    # An FSDP shard is gathered whole (every rank takes part, in the same order).
                    whole = (
                        parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
                    )
                    value = float(whole.detach().double().abs().sum())
                    total += value
                    if "lora_B" in name:
                        lora_b += value
            self.lora_checksum, self.lora_b_abs_sum = total, lora_b

    return RankCallback()


def _train_rank(run_dir: Path) -> None:
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    config = json.loads((run_dir / "spec.json").read_text())
    spec = TrainingSpec.from_json(config["spec"])
    output_dir = Path(config["output_dir"])
    train_records = json.loads((run_dir / "train.json").read_text())
    eval_records = json.loads((run_dir / "eval.json").read_text())

    # The process group comes first, on the backend this node needs (the Trainer's accelerate
    # state then joins it): NCCL with one GPU per rank, gloo on CPUs.
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")
    backend = str(dist.get_backend())
    world_size = dist.get_world_size()

    progress = (run_dir / PROGRESS_FILE).open("a", encoding="utf-8") if rank == 0 else None

    def on_progress(update: ProgressUpdate) -> None:
        if progress is not None:
            progress.write(json.dumps(dataclasses.asdict(update)) + "\n")
            progress.flush()

    callback = _rank_callback(run_dir)
    try:
        # should_stop stays False here: the rank callback stops all ranks together.
        result = train_lora(
            spec,
            train_records,
            eval_records,
            output_dir,
            TrainingHooks(on_progress=on_progress),
            extra_callbacks=[callback],
        )
    finally:
        if progress is not None:
            progress.close()

    rank_marker(run_dir, rank).write_text(
        json.dumps(
            {
                "rank": rank,
                "local_rank": local_rank,
                "world_size": world_size,
                "backend": backend,
                "threads": torch.get_num_threads(),
                "steps": result.steps,
                "total_steps": result.total_steps,
                "stopped_early": result.stopped_early,
                "stop_seen": callback.stop_seen,
                "examples": callback.examples,
                "tokens": callback.tokens,
                "lora_checksum": callback.lora_checksum,
                "lora_b_abs_sum": callback.lora_b_abs_sum,
                "sharded": callback.sharded,
            }
        )
    )
    if rank == 0:
        staging = run_dir / (RESULT_FILE + ".tmp")
        staging.write_text(json.dumps(dataclasses.asdict(result)))
        staging.rename(run_dir / RESULT_FILE)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """A rank's entry point: `python -m worker.distributed RUN_DIR`, started by torchrun."""
    from torch.distributed.elastic.multiprocessing.errors import record

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m worker.distributed RUN_DIR (started by torchrun)")
    logging.basicConfig(
        level=logging.INFO,
        format=f"[rank {os.environ.get('RANK', '?')}] %(levelname)s %(name)s: %(message)s",
    )
    # record() writes a failing rank's traceback where torchrun reports it.
    record(_train_rank)(Path(args[0]))


if __name__ == "__main__":
    main()
