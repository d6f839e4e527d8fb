"""Outputs appear whole or not at all: write into a hidden sibling directory, rename when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import jax

SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "chat_template.json",
              "added_tokens.json", "vocab.json", "merges.txt")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield `.<name>.tmp` beside `path`; on normal exit it replaces `path`, on error it is removed.

    The name is the same on every process (multi-host writers such as orbax share it); process 0
    does the file-system operations.
    """
    path = Path(path).absolute()
    tmp = path.parent / f".{path.name}.tmp"
    lead = jax.process_index() == 0
    if lead:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        yield tmp
        if lead:
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        if lead and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def copy_side_files(source: str | Path | None, dest: Path) -> None:
    """Tokenizer and generation-config files travel with the weights."""
    if source is None:
        return
    for name in SIDE_FILES:
        if (Path(source) / name).exists():
            shutil.copy2(Path(source) / name, dest / name)
