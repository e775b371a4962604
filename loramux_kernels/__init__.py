"""LoRA kernels: batch metadata, the reference semantics and the compute backends.

This package imports nothing of the project but its own modules.
"""
