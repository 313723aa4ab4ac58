"""Training benchmark: a tuneserve job against the bare PEFT + TRL recipe, same data and settings.

    .venv/bin/python bench/training.py [--rows 256] [--epochs 1] [--eval-rows 32]
                                       [--out results.json] [--quick] [--again]

Generates a chat dataset, trains it with bench/bare_recipe.py in a process of its own, then
through the real service (`tuneserve up`, temporary data dir: POST /files, POST /jobs, a worker),
then scores both adapters with one masking rule. With --again the service then runs the same
job once more (its evaluation reads the base model's side the first one kept) and reports that
job's end to end and overhead. See bench/README.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from children import in_child

REPO = Path(__file__).resolve().parent.parent
# What the worker logs once it has imported the training libraries (worker/celery_app.py).
WARMED_UP = "training libraries imported"
sys.path.insert(0, str(REPO))
from tests.corpus import CITIES, NAMES, TEMPLATES, jsonl, person_rows  # noqa: E402

BASE_MODEL = "smollm2-135m-instruct"
TEST_CACHE = REPO / ".test-cache" / "models"
MAX_LENGTH = 512
PASSED_ON = ("TUNESERVE_BF16",)  # given to the service when set (e.g. off: fp32 like the recipe)
TERMINAL = ("succeeded", "failed", "cancelled")
QUIET = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning",
}
JOBS = "nurse carpenter pilot teacher baker architect librarian chemist translator mechanic"
HOBBIES = (
    "chess; rock climbing; painting; sailing; gardening; the violin; running; pottery; "
    "birdwatching; cooking; photography; cycling"
).split("; ")
NOISE = (  # sentences the answer must ignore, some with a distracting age or city
    "The weather in {city} was mild that year.",
    "A new tram line opened near {name}'s flat last month.",
    "{name}'s neighbour keeps bees on the roof of the building.",
    "{name} once spent a week in {other} for a conference.",
    "{name}'s younger brother is {young_age} and studies law in {other}.",
    "The bakery on {name}'s street sells the best rye bread in {city}.",
    "Most mornings start with a long walk along the river before breakfast.",
    "{name} is saving up for a trip to {other} next summer.",
    "Friends describe {name} as patient, curious and a little stubborn.",
    "{name} reads two or three novels a month, mostly crime fiction.",
    "Last winter the heating in the apartment broke twice.",
    "{name}'s grandmother, now {old_age}, still lives in {other}.",
    "On Sundays the family meets for a long lunch that lasts until evening.",
    "A colleague from {other} recently joined {name}'s team.",
    "{name} has been learning Japanese with an app for almost a year.",
    "The local football club of {city} lost every match this season.",
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- data ------------------------------------------------------------------------------------


def profile_row(rng: random.Random, noise: int) -> dict[str, Any]:
    """A short biography with `noise` irrelevant sentences; the answer: one JSON object."""
    name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
    job, hobbies = rng.choice(JOBS.split()), rng.sample(HOBBIES, k=rng.randint(1, 3))
    article = "an" if job[0] in "aeiou" else "a"
    facts = [f"{name} works as {article} {job}."]
    facts += [f"On weekends {name} enjoys {hobby}." for hobby in hobbies]
    others = [c for c in CITIES if c != city]
    facts += [
        sentence.format(
            name=name,
            city=city,
            other=rng.choice(others),
            young_age=rng.randint(8, 30),
            old_age=rng.randint(75, 99),
        )
        for sentence in rng.sample(NOISE, k=noise)
    ]
    rng.shuffle(facts)
    text = " ".join([rng.choice(TEMPLATES).format(name=name, age=age, city=city), *facts])
    answer = {"name": name, "age": age, "city": city, "job": job, "hobbies": hobbies}
    return {
        "messages": [
            {"role": "user", "content": text},
            {"role": "assistant", "content": json.dumps(answer)},
        ]
    }


def chat_rows(count: int, seed: int) -> list[dict[str, Any]]:
    """Half one-sentence rows (tests.corpus.person_rows), half biographies: 70% with 1-5 noise
    sentences, 30% with 10-16. Shuffled: most batches of 8 mix short and long rows, so padding
    matters."""
    rng = random.Random(seed)
    rows = person_rows(count // 2, seed=seed)
    for _ in range(count - count // 2):
        long = rng.random() < 0.3
        rows.append(profile_row(rng, rng.randint(10, 16) if long else rng.randint(1, 5)))
    rng.shuffle(rows)
    return rows


def datasets(rows: int, eval_rows: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    train = chat_rows(rows, seed=7)
    seen = {row["messages"][0]["content"] for row in train}
    held_out = [
        row
        for row in chat_rows(eval_rows * 2, seed=99)
        if row["messages"][0]["content"] not in seen
    ]
    return train, held_out[:eval_rows]


# --- child processes (spawned: clean memory, no torch in the benchmark process) -------------


def assistant_targets(
    tokenizer: Any, messages: list[dict[str, str]]
) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and labels that keep only assistant tokens.

    The rule: an assistant message's tokens run from the end of the chat template rendered up to
    it with the generation prompt (`<|im_start|>assistant\\n`) to its end-of-turn token
    (`<|im_end|>`, included; the newline after it is not). Everything else is -100."""

    def ids(chat: list[dict[str, str]], prompt: bool = False) -> list[int]:
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    full = ids(messages)
    labels = [-100] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, upto = ids(messages[:i], prompt=True), ids(messages[: i + 1])
        start = len(prompt)
        if full[:start] != prompt or full[: len(upto)] != upto:
            raise ValueError("the chat template does not tokenize as a prefix of the whole")
        end = len(upto)
        if tokenizer.eos_token_id in upto[start:]:
            end = start + upto[start:].index(tokenizer.eos_token_id) + 1
        labels[start:end] = full[start:end]
    return full[:MAX_LENGTH], labels[:MAX_LENGTH]


def same_rule_eval(model_dir: str, adapters: dict[str, str | None], eval_path: str) -> Any:
    """Mean cross-entropy over the assistant tokens of the eval set (all tokens pooled, one row
    at a time: no padding), fp32, for the base model alone and with each adapter. Child process."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in Path(eval_path).read_text().splitlines()]
    encoded = [assistant_targets(tokenizer, row["messages"]) for row in rows]
    results = {}
    for name, adapter in adapters.items():
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = base if adapter is None else PeftModel.from_pretrained(base, adapter)
        model.eval()
        total, count = 0.0, 0
        with torch.inference_mode():
            for ids, labels in encoded:
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
                targets = torch.tensor(labels[1:])
                loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
                total, count = total + float(loss), count + int((targets != -100).sum())
        results[name] = {"eval_loss": round(total / count, 4), "tokens": count}
        log(f"same-rule eval: {name}: {total / count:.4f} over {count} assistant tokens")
    return results


# --- the bare recipe -------------------------------------------------------------------------


def run_bare(
    model_dir: str, train: Path, evals: Path, epochs: int, work: Path, trl_defaults: bool = False
) -> dict[str, Any]:
    """bench/bare_recipe.py in its own process; its lines are shown as it goes."""
    command = [sys.executable, str(REPO / "bench" / "bare_recipe.py"), "--model", model_dir]
    command += ["--train", str(train), "--eval", str(evals), "--epochs", str(epochs)]
    command += ["--trl-defaults"] if trl_defaults else []
    command += ["--output-dir", str(work / "bare"), "--result", str(work / "bare.json")]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        for line in proc.stdout or ():
            if line.strip():
                print(f"  bare | {line.rstrip()}", flush=True)
        if proc.wait() != 0:
            raise RuntimeError(f"bench/bare_recipe.py failed (exit code {proc.returncode})")
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
    result: dict[str, Any] = json.loads((work / "bare.json").read_text())
    result["script_seconds"] = round(time.perf_counter() - started, 2)
    result["adapter_dir"] = str(work / "bare" / "adapter")
    return result


# --- tuneserve -------------------------------------------------------------------------------


@contextmanager
def running_service(data_dir: Path, cache: Path, log_path: Path) -> Iterator[httpx.Client]:
    """`tuneserve up` (api, one worker, scheduler) on a free port with a temporary data dir;
    a client with the key `up` saved there. The whole process group is stopped on the way out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_") or k in PASSED_ON}
    env |= {
        "TUNESERVE_DATA_DIR": str(data_dir),
        "TUNESERVE_MODEL_CACHE_DIR": str(cache),
        "TUNESERVE_RATE_LIMIT_PER_MINUTE": "100000",
        "HF_HUB_OFFLINE": "1",
    }
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "app.cli.main", "up", "--port", str(port)]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url, key_file, began = f"http://127.0.0.1:{port}", data_dir / "api_key", time.monotonic()
    try:
        while not (key_file.is_file() and key_file.read_text().strip() and healthy(url)):
            if proc.poll() is not None or time.monotonic() - began > 180:
                raise RuntimeError(f"tuneserve up did not come up:\n{tail(log_path)}")
            time.sleep(0.5)
        # The job is submitted once the worker listens and has imported the training libraries
        # (worker/celery_app.py), as a worker waiting for jobs has: its wait is queue pickup,
        # not the worker's boot.
        while WARMED_UP not in log_path.read_text(errors="replace"):
            if time.monotonic() - began > 120:
                log(f"service: no {WARMED_UP!r} from the worker in its log after 120 s; going on")
                break
            time.sleep(0.5)
        log(f"service: up at {url} in {time.monotonic() - began:.0f} s (log {log_path})")
        headers = {"Authorization": f"Bearer {key_file.read_text().strip()}"}
        with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
            yield client
    finally:
        stop_group(proc)
        log("service: stopped")


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    answer = client.request(method, path, **kwargs)
    if answer.is_error:
        raise RuntimeError(f"{method} {path}: {answer.status_code} {answer.text}")
    return answer.json() if "json" in answer.headers.get("content-type", "") else answer.content


def when(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def follow(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """Poll GET /jobs/{id} every 2 s, printing each new status or step, until the job ends."""
    shown = None
    while True:
        job: dict[str, Any] = call(client, "GET", f"/jobs/{job_id}")
        progress = job.get("progress") or {}
        if (job["status"], progress.get("step")) != shown:
            shown = (job["status"], progress.get("step"))
            line = f"tuneserve: {job['status']}"
            if progress.get("total_steps"):
                line += f" step {progress.get('step', 0)}/{progress['total_steps']}"
            for key, label in (("train_loss", "loss"), ("tokens_per_second", "tokens/s")):
                if progress.get(key) is not None:
                    line += f" {label} {progress[key]:.4g}"
            log(line)
        if job["status"] in TERMINAL:
            return job
        time.sleep(2)


def training_seconds(
    job: dict[str, Any], events: list[dict[str, Any]], metrics: list[dict[str, Any]]
) -> tuple[float, str]:
    """The job's training-only seconds, and where they come from (the first source there is)."""
    done = next(event for event in events if event["type"] == "job.succeeded")
    data = done.get("data") or {}
    for key in ("train_seconds", "training_seconds"):
        if data.get(key):
            return float(data[key]), f"job.succeeded event data {key!r}"
    tokens = (job.get("progress") or {}).get("trained_tokens") or data.get("trained_tokens")
    steps = [point for point in metrics if point["train_loss"] is not None]
    if tokens and steps and steps[-1]["tokens_per_second"]:
        return tokens / steps[-1]["tokens_per_second"], (
            "trained_tokens / tokens_per_second of the last training step's metric point "
            "(the worker's clock from the first step to the last one)"
        )
    started = next(event for event in events if event["type"] == "job.training_started")
    return when(done["created_at"]) - when(started["created_at"]), (
        "events job.training_started -> job.succeeded (includes model load, eval and save)"
    )


def _second_job(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """The same job submitted again once the first is done, as another try on the same files:
    its evaluation finds the base model's side kept by the first (worker/base_side.py)."""
    job = call(client, "POST", "/jobs", json=body)
    log(f"tuneserve: the same job again, {job['id']}")
    job = follow(client, job["id"])
    if job["status"] != "succeeded":
        raise RuntimeError(f"second job {job['status']}: {job.get('error')}")
    events = call(client, "GET", f"/jobs/{job['id']}/events", params={"limit": 1000})["data"]
    metrics = call(client, "GET", f"/jobs/{job['id']}/metrics")["data"]
    seconds, _source = training_seconds(job, events, metrics)
    succeeded = next(e["data"] for e in events if e["type"] == "job.succeeded") or {}
    end_to_end = when(job["finished_at"]) - when(job["created_at"])
    return {
        "job": job["id"],
        "base_side_reused": (job.get("evaluation") or {}).get("base_side_reused"),
        "end_to_end_seconds": round(end_to_end, 2),
        "overhead_seconds": round(end_to_end - seconds, 2),
        "phases": succeeded.get("phases"),
    }


def run_tuneserve(
    cache: Path,
    train: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    epochs: int,
    work: Path,
    again: bool = False,
) -> dict[str, Any]:
    (work / "data").mkdir()
    with running_service(work / "data", cache, work / "up.log") as client:
        files = [("train.jsonl", train), ("eval.jsonl", evals)]
        ids = [
            call(client, "POST", "/files", files={"file": (n, jsonl(r))})["id"] for n, r in files
        ]
        body = {
            "base_model": BASE_MODEL,
            "dataset_url": ids[0],
            "validation_url": ids[1],
            "suffix": "bench",
            "hyperparameters": {
                "n_epochs": epochs,
                "batch_size": 8,
                "learning_rate": 2e-4,
                "max_seq_length": MAX_LENGTH,
            },
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        }
        submitted = time.perf_counter()
        job = call(client, "POST", "/jobs", json=body)
        log(f"tuneserve: uploaded {ids[0]} and {ids[1]}; job {job['id']} submitted")
        job = follow(client, job["id"])
        seen_done = time.perf_counter() - submitted
        events = call(client, "GET", f"/jobs/{job['id']}/events", params={"limit": 1000})["data"]
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job['status']}: {job.get('error')}\n{tail(work / 'up.log')}")
        metrics = call(client, "GET", f"/jobs/{job['id']}/metrics")["data"]
        adapter = job["adapter"]["id"]
        archive = call(client, "GET", f"/adapters/{adapter}/download")
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            tar.extractall(work / "tuneserve", filter="data")
        second = _second_job(client, body) if again else None
    seconds, source = training_seconds(job, events, metrics)
    submit = when(job["created_at"])
    timeline = [{"after_s": round(when(e["created_at"]) - submit, 2), **e} for e in events]
    log("tuneserve: the job's events (seconds after submit)")
    for event in timeline:
        log(f"  {event['after_s']:7.1f}  {event['type']}: {event['message']}")
    progress = job["progress"] or {}
    device = next((e["data"] for e in events if e["type"] == "job.device"), None) or {}
    succeeded = next(e["data"] for e in events if e["type"] == "job.succeeded") or {}
    return {
        "job": job["id"],
        "adapter": adapter,
        "adapter_dir": str(work / "tuneserve" / adapter),
        "precision": "bf16 autocast" if device.get("bf16_autocast") else "fp32",
        "tokens": progress.get("trained_tokens") or succeeded.get("trained_tokens"),
        "steps": progress.get("step"),
        "train_seconds": round(seconds, 2),
        "train_seconds_source": source,
        "job_tokens_per_second": progress.get("tokens_per_second"),
        "end_to_end_seconds": round(when(job["finished_at"]) - submit, 2),
        "end_to_end_seconds_polled": round(seen_done, 2),
        "overhead_seconds": round(when(job["finished_at"]) - submit - seconds, 2),
        "train_lora_seconds": succeeded.get("seconds"),
        "train_loss_last": progress.get("train_loss"),
        "train_loss_mean": succeeded.get("mean_train_loss"),
        "eval_loss": progress.get("eval_loss"),
        "dataset": job.get("dataset"),
        "timeline": [{k: e[k] for k in ("after_s", "type", "message")} for e in timeline],
        "again": second,
    }


# --- report ----------------------------------------------------------------------------------


def report(bare: dict[str, Any], served: dict[str, Any], same: dict[str, Any]) -> dict[str, Any]:
    bare["tokens_per_second"] = round(bare["tokens"] / bare["train_seconds"], 1)
    served["tokens_per_second"] = round(served["tokens"] / served["train_seconds"], 1)
    bare["overhead_seconds"] = round(bare["script_seconds"] - bare["train_seconds"], 2)
    bare["same_rule_eval_loss"] = same["bare"]["eval_loss"]
    served["same_rule_eval_loss"] = same["tuneserve"]["eval_loss"]
    ratio = round(served["tokens_per_second"] / bare["tokens_per_second"], 2)
    loss_diff = served["same_rule_eval_loss"] / bare["same_rule_eval_loss"] - 1
    rows = [
        ("precision", "fp32", served["precision"]),
        ("training tokens (non-padding)", bare["tokens"], served["tokens"]),
        ("training seconds", bare["train_seconds"], served["train_seconds"]),
        ("training tokens/s", bare["tokens_per_second"], served["tokens_per_second"]),
        ("tokens/s tuneserve/bare", "", f"{ratio}x"),
        ("end to end s (script / job)", bare["script_seconds"], served["end_to_end_seconds"]),
        ("overhead beyond training s", bare["overhead_seconds"], served["overhead_seconds"]),
        ("train loss, last step", bare["train_loss_last"], served["train_loss_last"]),
        ("train loss, mean", bare["train_loss_mean"], served["train_loss_mean"]),
        ("eval loss, as reported", bare["eval_loss"], served["eval_loss"]),
        ("eval loss, same rule", bare["same_rule_eval_loss"], served["same_rule_eval_loss"]),
        ("same rule: tuneserve vs bare", "", f"{loss_diff:+.1%}"),
    ]

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if value < 10 else f"{value:.1f}"
        return str(value)

    print(f"\n{'':32}{'bare recipe':>16}{'tuneserve':>16}")
    for label, left, right in rows:
        print(f"{label:32}{cell(left):>16}{cell(right):>16}")
    if served.get("again"):
        again = served["again"]
        print(
            f"\nthe same job again (base model's side reused: {again['base_side_reused']}): "
            f"end to end {again['end_to_end_seconds']} s, overhead beyond training "
            f"{again['overhead_seconds']} s; phases {again['phases']}"
        )
    print(f"\nbase model alone, same rule: eval loss {same['base']['eval_loss']:.4f}")
    print(f"tuneserve training seconds: {served['train_seconds_source']}")
    if abs(served["tokens"] / bare["tokens"] - 1) > 0.01:  # e.g. a padding-free collator
        speedup = bare["train_seconds"] / served["train_seconds"]
        print(f"token counts differ: same rows, so compare training seconds ({speedup:.2f}x)")
    return {"ratio_tokens_per_s": ratio, "same_rule_eval_loss_rel_diff": round(loss_diff, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="64 rows, 16 eval rows, 1 epoch")
    parser.add_argument(
        "--again",
        action="store_true",
        help="then run the same job once more, as a second try on the same files would",
    )
    parser.add_argument(
        "--trl-defaults",
        action="store_true",
        help="the bare recipe with TRL's default activation checkpointing (a weaker baseline)",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as on Ctrl-C
    for name, value in QUIET.items():  # for every child process: no progress bars, no warnings
        os.environ.setdefault(name, value)
    if args.quick:
        args.rows, args.eval_rows, args.epochs = 64, 16, 1
    started = time.perf_counter()
    ready = (TEST_CACHE / BASE_MODEL / "config.json").is_file()
    cache = TEST_CACHE if ready else Path("~/.tuneserve/models").expanduser()
    from app.base_models.loading import model_location  # converts the GGUF once if needed
    from app.base_models.registry import get_base_model
    from app.settings import Settings

    settings = Settings(model_cache_dir=cache)
    model_dir = model_location(settings, get_base_model(settings, BASE_MODEL))
    cpuinfo = Path("/proc/cpuinfo").read_text()
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line]
    machine = {"cpus": os.cpu_count(), "cpu": names[0] if names else platform.processor()}
    machine |= {"cpu_bf16": "avx512_bf16" in cpuinfo or "amx_bf16" in cpuinfo}
    machine |= {"platform": platform.platform()}
    train, evals = datasets(args.rows, args.eval_rows)
    log(f"{len(train)} training rows, {len(evals)} eval rows, {args.epochs} epoch(s); {model_dir}")
    log(f"machine: {machine['cpus']} CPUs, {machine['cpu']}, bf16 {machine['cpu_bf16']}")

    with tempfile.TemporaryDirectory(prefix="tuneserve-bench-training-") as tmp:
        work = Path(tmp)
        (work / "train.jsonl").write_bytes(jsonl(train))
        (work / "eval.jsonl").write_bytes(jsonl(evals))
        log("bare recipe: bench/bare_recipe.py in its own process")
        files = (work / "train.jsonl", work / "eval.jsonl")
        bare = run_bare(model_dir, *files, args.epochs, work, args.trl_defaults)
        log("tuneserve: starting `tuneserve up` with a temporary data dir")
        served = run_tuneserve(cache, train, evals, args.epochs, work, args.again)
        log("same-rule eval: base model, bare adapter, tuneserve adapter (fresh process)")
        adapters = {"base": None, "bare": bare["adapter_dir"], "tuneserve": served["adapter_dir"]}
        same = in_child(same_rule_eval, model_dir, adapters, str(work / "eval.jsonl"))

    summary = report(bare, served, same)
    log(f"benchmark wall time {time.perf_counter() - started:.0f} s")
    if args.out:
        names = ("rows", "eval_rows", "epochs", "quick", "again", "trl_defaults")
        config = {k: getattr(args, k) for k in names}
        config |= {"base_model": BASE_MODEL, "model_dir": model_dir, "max_length": MAX_LENGTH}
        config |= {k: os.environ[k] for k in PASSED_ON if k in os.environ}
        results = {"config": config, "machine": machine, "bare": bare, "tuneserve": served}
        results |= {"same_rule_eval": same, **summary}
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        log(f"results written to {args.out}")


if __name__ == "__main__":
    main()
