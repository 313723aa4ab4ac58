"""Fine-tuning jobs: submission, lifecycle, progress, events."""
