"""Durable operations: long actions recorded step by step, watchable, resumable."""
