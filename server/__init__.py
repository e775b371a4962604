"""loramux server: HTTP API, engine loop, model runner, model code, config and CLI."""
