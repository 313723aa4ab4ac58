"""Exports of a trained adapter: merged into its base model, as GGUF, with an Ollama Modelfile.

Pure functions of folders and files on disk; the API, task and CLI around them live elsewhere.
"""

from worker.exports.errors import ExportError
from worker.exports.gguf import write_gguf
from worker.exports.merged import merge_adapter
from worker.exports.modelfile import ollama_modelfile, ollama_modelfile_for

__all__ = ["ExportError", "merge_adapter", "ollama_modelfile", "ollama_modelfile_for", "write_gguf"]
