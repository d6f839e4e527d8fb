"""Fault injection for the trainer tests, through a hook (the production loop has none):

    python tests/train_with_hook.py kill|sigterm STEP[@PROCESS] key=value ...

runs `minitron distill key=value ...` (the CLI's own path: its summary, messages and exit code) with
one hook added to `train`.
`kill`: once STEP is done and the earlier checkpoints have landed, SIGKILL this process (no cleanup).
`sigterm`: at STEP, raise SIGTERM in this process, as a preemption notice would (the trainer finishes
the step, checkpoints it, and the CLI exits 143). With @PROCESS, only in the process of that index
(jax.process_index(), in a multi-process job): the others must stop at the same step."""

import functools
import os
import signal
import sys

import jax

from minitron_jax.run.cli import main as cli_main
from minitron_jax.train import trainer


def main(argv: list[str]) -> None:
    action, at, *overrides = argv
    if action not in ("kill", "sigterm"):
        raise SystemExit(f"unknown action {action!r}: use kill or sigterm")
    step, _, process = at.partition("@")

    def hook(run):
        if run.step != int(step) or (process and jax.process_index() != int(process)):
            return
        if action == "kill":
            run.checkpoints.wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL)
        signal.raise_signal(signal.SIGTERM)  # delivered to this thread before raise_signal returns

    trainer.train = functools.partial(trainer.train, hooks=[hook])  # cli.cmd_train imports it at call time
    cli_main(["distill", *overrides])


if __name__ == "__main__":
    main(sys.argv[1:])
