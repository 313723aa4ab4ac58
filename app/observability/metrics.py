"""Prometheus metrics of the api, one registry per app (several apps may share a process).

Job figures are read from SQL when /metrics is scraped (`JobsCollector`), so every api replica
reports the same, whichever worker ran the jobs. Generation and adapter-cache figures are
counted in this process by the inference engine (`InferenceMetrics`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from app.db import unit_of_work
from app.jobs.models import TERMINAL_STATUSES, JobStatus
from app.observability.readiness import describe, in_background
from app.observability.repository import JobStats, job_stats

logger = logging.getLogger(__name__)

# Jobs last from seconds (the tiny test model) to a day (a large model on a CPU).
MINUTES = (1, 2, 5, 10, 30, 60, 120, 240, 480, 1440)
JOB_DURATION_BOUNDS = (10.0, 30.0, *(60.0 * minutes for minutes in MINUTES))
GENERATE_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
# A scrape answers within this even when the database hangs (Prometheus gives up at 10 s).
SQL_SECONDS = 5.0


class InferenceMetrics:
    """What the inference engines of this process count: generations (built-in or vLLM), the
    adapter cache of the built-in engine, and the adapters loaded into vLLM servers."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.generate_seconds = Histogram(
            "tuneserve_generate_seconds",
            "Time from a generation request reaching the inference engine to its last token "
            "(loading the base model on first use included); kind is base or adapter, stream "
            "whether the answer was streamed. Cancelled and failed generations are not counted.",
            ["kind", "stream"],
            buckets=GENERATE_BOUNDS,
            registry=registry,
        )
        self.generate_tokens = Counter(
            "tuneserve_generate_tokens",
            "Tokens generated (completion tokens), by kind (base or adapter).",
            ["kind"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "tuneserve_generate_prompt_tokens",
            "Prompt tokens of the generations, by kind (base or adapter).",
            ["kind"],
            registry=registry,
        )
        self.adapter_cache_hits = Counter(
            "tuneserve_adapter_cache_hits",
            "Generations whose adapter was already in a slot.",
            registry=registry,
        )
        self.adapter_cache_misses = Counter(
            "tuneserve_adapter_cache_misses",
            "Generations whose adapter had to be loaded into a slot.",
            registry=registry,
        )
        self.adapter_cache_evictions = Counter(
            "tuneserve_adapter_cache_evictions",
            "Adapters taken out of their slot to make room for another "
            "(TUNESERVE_ADAPTER_CACHE_SIZE slots per base model).",
            registry=registry,
        )
        self.adapter_cache_slots_used = Gauge(
            "tuneserve_adapter_cache_slots_used",
            "Adapters in a slot now, over every loaded base model.",
            registry=registry,
        )
        self.vllm_adapters_loaded = Gauge(
            "tuneserve_vllm_adapters_loaded",
            "Adapters this api process has loaded into vLLM servers (base models with serving "
            "vllm) and not unloaded: at most TUNESERVE_VLLM_MAX_LORAS per server, beyond while "
            "they generate.",
            registry=registry,
        )
        self.vllm_adapter_loads = Counter(
            "tuneserve_vllm_adapter_loads",
            "Adapters loaded into a vLLM server (POST /v1/load_lora_adapter) for a generation.",
            registry=registry,
        )
        self.vllm_adapter_unloads = Counter(
            "tuneserve_vllm_adapter_unloads",
            "Adapters unloaded from a vLLM server: the least recently used beyond "
            "TUNESERVE_VLLM_MAX_LORAS, and deleted ones.",
            registry=registry,
        )
        for kind in ("base", "adapter"):  # every series from the start, at 0
            self.generate_tokens.labels(kind)
            self.prompt_tokens.labels(kind)
            for stream in ("true", "false"):
                self.generate_seconds.labels(kind, stream)

    def observe_generation(
        self,
        *,
        adapter: bool,
        streamed: bool,
        seconds: float,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        kind = "adapter" if adapter else "base"
        self.generate_seconds.labels(kind, "true" if streamed else "false").observe(seconds)
        self.generate_tokens.labels(kind).inc(completion_tokens)
        self.prompt_tokens.labels(kind).inc(prompt_tokens)


class JobsCollector(Collector):
    """Job figures from SQL at each scrape; when the database does not answer, only
    `tuneserve_database_up 0` (next to the figures of this process)."""

    def describe(self) -> Iterator[Metric]:
        return iter([_database_up(False), _scrape_seconds(0.0), *_job_families(None)])

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        try:
            stats = in_background(_read_stats, "metrics-sql").result(timeout=SQL_SECONDS)
        except TimeoutError:
            logger.warning("metrics: the database did not answer within %g s", SQL_SECONDS)
            return iter([_database_up(False)])
        except Exception as error:
            logger.warning("metrics: could not read jobs from the database: %s", describe(error))
            return iter([_database_up(False)])
        seconds = time.monotonic() - started
        return iter([_database_up(True), _scrape_seconds(seconds), *_job_families(stats)])


def _read_stats() -> JobStats:
    with unit_of_work() as session:
        return job_stats(session, duration_bounds=JOB_DURATION_BOUNDS)


def _database_up(up: bool) -> Metric:
    return GaugeMetricFamily(
        "tuneserve_database_up",
        "1 when this scrape read the job figures from the SQL database, else 0 (and no job "
        "figures).",
        value=1 if up else 0,
    )


def _scrape_seconds(seconds: float) -> Metric:
    return GaugeMetricFamily(
        "tuneserve_database_scrape_seconds",
        "How long this scrape took to read the job figures from SQL.",
        value=seconds,
    )


def _job_families(stats: JobStats | None) -> list[Metric]:
    """The job metrics, with the samples of `stats` (none without)."""
    jobs = GaugeMetricFamily(
        "tuneserve_jobs", "Jobs in each status now (every job ever submitted).", labels=["status"]
    )
    finished = CounterMetricFamily(
        "tuneserve_jobs_finished",
        "Jobs that ended, by terminal status (succeeded, failed, cancelled).",
        labels=["status"],
    )
    queued = GaugeMetricFamily(
        "tuneserve_queue_depth", "Jobs waiting in each queue (status queued).", labels=["queue"]
    )
    durations = HistogramMetricFamily(
        "tuneserve_job_duration_seconds",
        "Duration of the jobs that ended, from the start of training (from submission for jobs "
        "that never started) to the end, by terminal status.",
        labels=["status"],
    )
    speed = GaugeMetricFamily(
        "tuneserve_training_tokens_per_second",
        "Training speed of the running jobs together, as each last reported it.",
    )
    trained = CounterMetricFamily(
        "tuneserve_trained_tokens", "Tokens trained on by the jobs that succeeded."
    )
    families: list[Metric] = [jobs, finished, queued, durations, speed, trained]
    if stats is None:
        return families
    by_status = dict.fromkeys(JobStatus, 0)
    waiting: dict[str, int] = {}  # every queue that has jobs, at 0 when none waits
    for (status, queue), count in stats.jobs.items():
        by_status[status] += count
        waiting[queue] = waiting.get(queue, 0) + (count if status == JobStatus.QUEUED else 0)
    for status, count in by_status.items():
        jobs.add_metric([status.value], count)
        if status in TERMINAL_STATUSES:
            finished.add_metric([status.value], count)
    for queue, count in sorted(waiting.items()):
        queued.add_metric([queue], count)
    for status in sorted(TERMINAL_STATUSES):
        ended = stats.durations.get(status)
        cumulative = ended.buckets if ended else [0] * len(JOB_DURATION_BOUNDS)
        buckets = [
            (str(bound), count)  # as Histogram writes it: 10.0
            for bound, count in zip(JOB_DURATION_BOUNDS, cumulative, strict=True)
        ]
        buckets.append(("+Inf", ended.count if ended else 0))
        durations.add_metric([status.value], buckets, ended.total_seconds if ended else 0.0)
    speed.add_metric([], stats.tokens_per_second)
    trained.add_metric([], stats.trained_tokens)
    return families


def make_registry() -> tuple[CollectorRegistry, InferenceMetrics]:
    """The registry of one app: job figures from SQL, this process's inference counters and its
    resource use (process_*, python_info)."""
    registry = CollectorRegistry()
    registry.register(JobsCollector())
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry, InferenceMetrics(registry)
