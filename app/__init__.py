"""tuneserve: a self-hosted LoRA fine-tuning service."""
