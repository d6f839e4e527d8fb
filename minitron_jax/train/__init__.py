"""The run config, preflight checks, the trainer and its steps, resume, the stored-logit reader."""
