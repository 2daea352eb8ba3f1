"""Offline defaults for the demo: a small instruct model and a text corpus, built once into a local cache."""
from .smollm2 import smollm2_dir
from .stdlib_docs import stdlib_corpus_dir

__all__ = ["smollm2_dir", "stdlib_corpus_dir"]
