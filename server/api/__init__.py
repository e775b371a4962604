"""HTTP API: LoRAX/TGI-compatible generate, OpenAI-compatible completions, adapter management."""
