"""Uploaded files (datasets), stored in the artifact directory."""
