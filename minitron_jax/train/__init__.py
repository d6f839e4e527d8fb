"""Training: the run config (run_config), preflight checks (preflight), the objective and its teacher source
(objective), the jitted steps (steps), the hooks after each step (hooks), setup and loop (trainer), resume,
the stored-logit reader (stored_logits)."""
