"""Trained LoRA adapters, registered when their job succeeds."""
