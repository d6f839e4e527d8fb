"""What `loader.Loader` reads training rows from (`RowSource`): the in-memory `packing.PackedRows` and the
token-store sources of `store_reader` (`StoreWindows`, `FirstFitStream`, `Blend`).

A source is finite (`stream` False: the Loader shuffles and repeats it, and a resume checks its length) or an
endless sequence already in training order (`stream` True: a resume checks its `identity`). `get_state` is
what the source adds to the loader state (first_fit block cursors: `{"cursors": [...]}`, else nothing) and
`set_state` takes it back; both are explicit members, so a rename is an error, never a silently lost cursor.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class RowSource(Protocol):
    """Rows by index: `source[i]` -> {"input_ids", "segment_ids": int32 [seq_len], "mask": float32 [seq_len]}.
    Subclasses inherit the stateless defaults (no cursors)."""

    seq_len: int
    stream: bool = False  # an endless sequence in training order (True), or finite rows the Loader shuffles

    @property
    def identity(self) -> str:
        """Names the rows and their order (store, tokens, seq_len, layout); a stream's resume is checked by it."""
        ...

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict: ...

    def get_state(self) -> dict:
        """What the loader state records for this source (JSON-able; {} when it keeps no position)."""
        return {}

    def set_state(self, state: dict) -> None:
        """Take back what `get_state` recorded (the loader state as saved; keys it does not know are ignored)."""
