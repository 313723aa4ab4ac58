"""The training side of tuneserve: Celery app, tasks and the LoRA training pipeline."""
