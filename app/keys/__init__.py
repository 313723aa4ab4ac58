"""API keys: who is calling, and which owner their resources belong to."""
