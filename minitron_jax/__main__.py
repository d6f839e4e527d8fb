"""The `minitron` command (and `python -m minitron_jax`): choose the host allocator, then run the CLI.

`core.allocator.ensure()` re-executes the command under mimalloc before jax is imported, so the CLI
(which imports jax, flax and transformers) is imported only after it: the one package import inside a
function, kept lazy on purpose."""

from minitron_jax.core.allocator import ensure


def main() -> None:
    ensure()
    from minitron_jax.run.cli import main as cli_main  # heavy: jax, flax, transformers
    cli_main()


if __name__ == "__main__":
    main()
