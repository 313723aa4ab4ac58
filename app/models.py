"""Every SQL table, imported in one place so metadata (and Alembic) sees them all."""

from app.adapters.models import Adapter
from app.db import Base
from app.exports.models import AdapterExport
from app.files.models import File
from app.jobs.models import Job, JobCheckpoint, JobEvent, JobMetric, Throughput
from app.keys.models import ApiKey
from app.webhooks.models import WebhookDelivery

__all__ = [
    "Adapter",
    "AdapterExport",
    "ApiKey",
    "Base",
    "File",
    "Job",
    "JobCheckpoint",
    "JobEvent",
    "JobMetric",
    "Throughput",
    "WebhookDelivery",
]
