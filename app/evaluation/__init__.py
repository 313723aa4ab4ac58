"""Automatic evaluation after training: base model against adapter, on rows not trained on."""
