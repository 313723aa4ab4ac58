"""Base models a job can fine-tune: the built-in default and operator entries."""
