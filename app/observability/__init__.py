"""Metrics (GET /metrics, Prometheus) and readiness (GET /readyz) of the api."""
