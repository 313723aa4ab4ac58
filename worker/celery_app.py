"""The worker's Celery app: the tasks of worker/tasks.py, configured as app/queue.py sends them.
The broker only carries "run job X" messages; SQL holds all job state."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Celery, signals

from app.logs import configure_logging
from app.queue import celery_config
from app.settings import get_settings

logger = logging.getLogger(__name__)


# The embedded broker (kombu's SQLAlchemy transport) polls its table for messages: every 0.1 s
# here, not kombu's default 1 s, which a job waited half of on average before a worker took it.
# A poll is one small query, and a worker busy with a job does not poll. Set on the class:
# kombu hands every transport option of this transport to create_engine, which refuses this one.
EMBEDDED_BROKER_POLL_SECONDS = 0.1


def make_celery() -> Celery:
    from kombu.transport import sqlalchemy

    sqlalchemy.Transport.polling_interval = EMBEDDED_BROKER_POLL_SECONDS
    settings = get_settings()
    settings.ensure_dirs()
    app = Celery("tuneserve", broker=settings.celery_broker_url, include=["worker.tasks"])
    app.conf.update(celery_config(settings.celery_broker_url))
    return app


celery_app = make_celery()


# Logging of the worker: tuneserve's (JSON lines by default, TUNESERVE_LOG_FORMAT), not Celery's.
@signals.celeryd_init.connect  # type: ignore[untyped-decorator]
def _log_from_the_start(instance: Any, **_: Any) -> None:
    # Before Celery's first words (its check of privileges may warn), and without its banner,
    # whose many lines are not JSON: _log_start says the same in one line.
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    if settings.log_format == "json":
        instance.quiet = True


@signals.setup_logging.connect  # type: ignore[untyped-decorator]
def _setup_logging(**_: Any) -> None:
    # With a receiver here Celery neither configures logging nor sends stdout and stderr to a
    # logger: both are done here instead, so what a job prints (progress bars, libraries'
    # output) becomes log lines that carry the job id too.
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    if celery_app.conf.worker_redirect_stdouts:
        celery_app.log.redirect_stdouts(celery_app.conf.worker_redirect_stdouts_level)


@signals.celeryd_after_setup.connect  # type: ignore[untyped-decorator]
def _log_start(sender: str, instance: Any, **_: Any) -> None:
    if get_settings().log_format == "json":
        with instance.app.connection_for_read() as connection:
            broker = connection.as_uri()  # without the password
        queues = ", ".join(sorted(instance.app.amqp.queues))
        logger.info("worker %s consuming %s from %s", sender, queues, broker)


# The libraries a job trains with, imported while the worker waits for its first job: about 5.5 s
# here (torch, transformers, PEFT with bitsandbytes, TRL's trainers, and the worker's modules
# that run a job) that the first job would otherwise spend before its first step. Held while
# they import: a job that comes sooner waits for the rest (wait_for_warm_up), since TRL's and
# transformers' lazy modules are not safe to import from two threads at once.
_warming_up = threading.Lock()


WARMED_UP = "training libraries imported"  # the log line that says so (bench/training.py)


def _import_training_stack() -> None:
    started = time.monotonic()
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        from peft.import_utils import is_bnb_available
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
        from trl import DPOTrainer, SFTTrainer  # type: ignore[attr-defined] # noqa: F401

        import worker.runner  # noqa: F401  (the job's own modules: another 0.5 s here)

        if is_bnb_available():
            # What PEFT imports on the first LoRA model it builds where bitsandbytes is installed:
            # its quantized layers, bitsandbytes, and through it torch's compiler (1.3 s here).
            import peft.tuners.lora.bnb  # noqa: F401
    except Exception:  # a job importing them fails with the real error, by name
        logger.warning("could not import the training libraries ahead of jobs", exc_info=True)
    else:
        logger.info("%s in %.1f s", WARMED_UP, time.monotonic() - started)
    finally:
        _warming_up.release()


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _warm_up(**_: Any) -> None:
    _warming_up.acquire()  # before the worker takes its first job
    threading.Thread(target=_import_training_stack, name="warm-up", daemon=True).start()


def wait_for_warm_up() -> None:
    """Return once the training libraries are imported, or at once when no warm-up runs."""
    with _warming_up:
        pass
