"""The one place tuneserve reads its configuration from (environment, `TUNESERVE_` prefix)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
LogFormat = Literal["json", "text"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNESERVE_", extra="ignore")

    data_dir: Path = Field(
        default=Path("~/.tuneserve"),
        description="Holds the SQLite databases, artifacts (datasets, adapters) and model cache.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the SQL store. Default: SQLite file in the data dir.",
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker URL. Default: SQLAlchemy transport on a SQLite file in the "
        "data dir. Production: redis://host:6379/0.",
    )
    model_cache_dir: Path | None = Field(
        default=None,
        description="Where converted and downloaded base models live. Default: DATA_DIR/models.",
    )
    artifacts_url: str | None = Field(
        default=None,
        description="Where datasets, adapters and checkpoints are stored: a directory or "
        "s3://bucket/prefix shared by api replicas and workers. Default: DATA_DIR/artifacts.",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, Ceph…); AWS when unset."
    )
    s3_access_key_id: str | None = Field(
        default=None, description="S3 access key; the AWS credential chain when unset."
    )
    s3_secret_access_key: SecretStr | None = Field(default=None, description="S3 secret key.")
    s3_region: str | None = Field(default=None, description="S3 region.")
    api_url: str = Field(
        default="http://127.0.0.1:8000",
        description="Where the CLI finds the api.",
    )
    default_base_model: str = Field(
        default=DEFAULT_BASE_MODEL,
        description="Base model used when a job or generation names none.",
    )
    models_file: Path | None = Field(
        default=None,
        description="TOML file of operator base models ([models.NAME] with path= or hf_id=; "
        'serving = "vllm" and vllm_url= to generate through a vLLM server).',
    )
    allowed_file_dirs: list[Path] = Field(
        default_factory=list,
        description="Directories a file:// dataset URL may point into (JSON list).",
    )
    max_dataset_bytes: int = Field(
        default=512 * 1024 * 1024,
        gt=0,
        description="Largest dataset file fetched or uploaded, and largest once decompressed.",
    )
    max_dataset_rows: int = Field(
        default=1_000_000, gt=0, description="Most rows a dataset file may hold."
    )
    fetch_timeout_seconds: float = Field(
        default=60.0, gt=0, description="Timeout of each network step of fetching a dataset URL."
    )
    fetch_max_seconds: float = Field(
        default=900.0, gt=0, description="Longest a whole dataset download may take."
    )
    allow_private_networks: bool = Field(
        default=False,
        description="Let dataset URLs reach loopback, private and link-local addresses (off: "
        "only public hosts, so a URL cannot probe the internal network).",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="The CLI's API key. Default: the local key `tuneserve up` saved in the data "
        "dir.",
    )
    rate_limit_per_minute: int = Field(
        default=600, ge=1, description="Requests per minute per API key (429 beyond)."
    )
    rate_limit_storage_url: str = Field(
        default="memory://",
        description="Where request counts live: memory:// (one api process) or "
        "redis://host:6379/1 (shared by api replicas).",
    )
    max_jobs_in_flight: int = Field(
        default=20, ge=1, description="Queued or running jobs one owner may have at once."
    )
    max_request_bytes: int = Field(
        default=8 * 1024 * 1024, gt=0, description="Largest JSON request body."
    )
    progress_interval_seconds: float = Field(
        default=2.0, gt=0, description="How often a training job writes progress to SQL."
    )
    heartbeat_interval_seconds: float = Field(
        default=5.0, gt=0, description="How often a worker beats a running job's heartbeat."
    )
    stale_job_seconds: float = Field(
        default=120.0,
        gt=0,
        description="A claimed job whose heartbeat is older than this has lost its worker.",
    )
    requeue_queued_after_seconds: float = Field(
        default=600.0,
        gt=0,
        description="A queued job unclaimed this long is enqueued again (lost broker message).",
    )
    max_attempts: int = Field(
        default=3, ge=1, description="A job whose worker died this many times fails."
    )
    reaper_interval_seconds: float = Field(
        default=30.0, gt=0, description="How often the scheduler looks for lost jobs."
    )
    auto_eval_rows: int = Field(
        default=32,
        ge=0,
        le=1000,
        description="Rows the automatic evaluation after training scores, base model against "
        "adapter (a job without a validation set holds up to this many out of training); 0 "
        "turns the evaluation off.",
    )
    auto_eval_samples: int = Field(
        default=3,
        ge=0,
        le=20,
        description="Sample answers of the base model and of the adapter stored with each job.",
    )
    webhook_max_attempts: int = Field(
        default=8,
        ge=1,
        le=50,
        description="A webhook not answered 2xx is tried this many times in all, then given up.",
    )
    webhook_retry_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Wait before a webhook's first retry; each later wait doubles (at most 1 h).",
    )
    webhook_timeout_seconds: float = Field(
        default=10.0, gt=0, description="How long one webhook attempt may take."
    )
    webhook_poll_seconds: float = Field(
        default=2.0, gt=0, description="How often the scheduler sends due webhooks."
    )
    adapter_cache_size: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Adapter slots per base model in the api: adapters loaded at once, each "
        "usable in the same batch (least recently used evicted).",
    )
    merge_single_adapter: bool = Field(
        default=True,
        description="While one adapter serves every running generation of a base model, decode "
        "with a copy of the adapted layers' weights that has it merged in: the base model's "
        "speed instead of about 0.85x at batch size one, for the memory of one more copy of "
        "those layers (built-in engine only).",
    )
    inference_precision: str = Field(
        default="auto",
        pattern="^(auto|bf16|fp32)$",
        description="Precision of generation: auto = bf16 where the device runs it natively "
        "(GPUs with bf16, CPUs with AVX512-BF16 or AMX), fp32 otherwise.",
    )
    vllm_max_loras: int = Field(
        default=8,
        ge=1,
        le=1024,
        description="Adapters tuneserve keeps loaded in each vLLM server (base models with "
        'serving = "vllm"): beyond, the least recently used idle one is unloaded. Match the '
        "server's --max-loras (or its --max-cpu-loras when larger).",
    )
    vllm_timeout_seconds: float = Field(
        default=600.0,
        gt=0,
        description="Longest wait for a vLLM server's answer, or for the next piece of a "
        "streamed one.",
    )
    max_new_tokens_limit: int = Field(
        default=1024, ge=1, description="Largest max_new_tokens a generation may ask for."
    )
    checkpoint_every_steps: int = Field(
        default=50, ge=1, description="A running job saves a checkpoint every N steps…"
    )
    checkpoint_every_minutes: float = Field(
        default=10.0, gt=0, description="…and at least this often (minutes)."
    )
    checkpoints_kept: int = Field(
        default=3, ge=1, description="Newest checkpoints kept per job (older ones are deleted)."
    )
    default_queue: str = Field(
        default="training",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Queue of jobs that name no accelerator; every worker should consume it.",
    )
    worker_queues: list[str] = Field(
        default_factory=lambda: ["training"],
        description='Queues a worker consumes (JSON list), e.g. ["training", "training-rocm"]: '
        "jobs asking for an accelerator class go to training-<class>.",
    )
    bf16: str = Field(
        default="auto",
        pattern="^(auto|on|off)$",
        description="Train in bf16 autocast: auto = where the device runs bf16 natively.",
    )
    training_processes: int = Field(
        default=1,
        ge=0,
        description="Processes (GPUs) one job trains on, data-parallel through torchrun; 0 = "
        "every GPU of the node.",
    )
    device_memory_bytes: int | None = Field(
        default=None,
        gt=0,
        description="Memory of one training device (bytes) that job plans, the fit check at "
        "submission and auto batch_size assume. Default: what workers of the target class "
        "recorded (GPU memory, or the machine's RAM for CPU workers), else this machine's.",
    )
    log_level: str = Field(default="INFO", description="Log level of every process.")
    log_format: LogFormat = Field(
        default="json",
        description="Log lines of every process: json = one JSON object per line (ts, level, "
        "logger, process, message, job_id while a worker runs a job, exception), for log "
        "collectors; text = one human-readable line.",
    )
    metrics_public: bool = Field(
        default=True,
        description="Serve GET /metrics (Prometheus) without an API key, like /healthz and "
        "/readyz; false: it needs a key like every other route.",
    )

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'tuneserve.sqlite'}"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.data_dir / 'broker.sqlite'}"

    @property
    def api_key_file(self) -> Path:
        return self.data_dir / "api_key"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def model_cache_path(self) -> Path:
        return (self.model_cache_dir or self.data_dir / "models").expanduser()

    def ensure_dirs(self) -> None:
        for directory in (self.data_dir, self.artifacts_dir, self.model_cache_path):
            directory.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
