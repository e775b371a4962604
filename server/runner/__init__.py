"""The model runner: turns a SchedulerOutput into one batched forward and sampled tokens."""
