"""Fault injection for the trainer tests, through a hook (the production loop has none):

    python tests/train_with_hook.py kill|sigterm STEP key=value ...

`kill`: once STEP is done and the earlier checkpoints have landed, SIGKILL this process (no cleanup).
`sigterm`: at STEP, raise SIGTERM in this process, as a preemption notice would (the trainer finishes
the step, checkpoints it and returns)."""

import os
import signal
import sys

from minitron_jax.distill import train
from minitron_jax.recipe import load_recipe


def main(argv: list[str]) -> None:
    action, at, *overrides = argv
    if action not in ("kill", "sigterm"):
        raise SystemExit(f"unknown action {action!r}: use kill or sigterm")

    def hook(run):
        if run.step != int(at):
            return
        if action == "kill":
            run.checkpoints.wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL)
        signal.raise_signal(signal.SIGTERM)  # delivered to this thread before raise_signal returns

    summary = train(load_recipe(None, overrides), hooks=[hook])
    print(f"summary: preempted_at={summary.get('preempted_at')}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
