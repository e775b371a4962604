"""Demo adapters for the default model: training (train_demo_adapters), checking (demo_check)."""
