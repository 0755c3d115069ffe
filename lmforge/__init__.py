"""lmforge: turn a general LLM into a domain model — data, fine-tuning, verification, export and serving."""

__version__ = "0.1.0"
