"""OpenAI-compatible surface under /v1: a thin translation of OpenAI's request and response shapes
over the same services as the native API (files, jobs, adapters, inference)."""
