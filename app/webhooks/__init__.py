"""Webhooks: a job's terminal state POSTed to the URL its owner gave, signed and retried."""
