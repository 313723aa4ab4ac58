"""tuneserve: a self-hosted LoRA fine-tuning service."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tuneserve")
except PackageNotFoundError:  # running from a checkout that was not installed
    __version__ = "0.0.0"
