"""SQL table of adapter exports: one row per format asked of an adapter."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow


class AdapterExport(Base):
    __tablename__ = "adapter_exports"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    adapter_id: Mapped[str] = mapped_column(
        ForeignKey("adapters.id", ondelete="CASCADE"), index=True
    )
    owner: Mapped[str] = mapped_column(String(64), index=True)
    format: Mapped[str] = mapped_column(String(16))  # merged | gguf
    precision: Mapped[str] = mapped_column(String(16))  # merged: dtype; gguf: f16, q8_0, f32
    status: Mapped[str] = mapped_column(String(16))  # queued, running, succeeded, failed
    # {"stage": ..., "done": n, "total": m} while it runs.
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The files made, each {"name", "bytes", "sha256"}, under `path` in the artifact store.
    files: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    path: Mapped[str] = mapped_column(Text)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
