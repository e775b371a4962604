"""Our own Llama-family forward (Llama, Mistral, Qwen2) over a flat batch of many sequences."""
