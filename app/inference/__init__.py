"""Text generation with the base models and their adapters."""
