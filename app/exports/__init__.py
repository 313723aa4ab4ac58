"""Adapter exports: an adapter merged into its base model (Hugging Face safetensors) or written
as one GGUF file for llama.cpp and Ollama, made by a worker and downloaded with resume."""
