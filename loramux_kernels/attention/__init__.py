"""Attention over the paged KV cache: one protocol, chosen once at start-up (see backend.py)."""
