"""One description of a command's data (`DataSpec`), resolved once from what the user passed: what `data` is
(text to tokenize, one token store, or a blend of stores), how its documents split, and which rows each use
reads. Every command and pipeline stage asks it instead of deciding again.

* Kind: a blend is a dict `{STORE: weight}` (`store_reader.parse_blend`, which refuses what cannot be mixed);
  a token store is a directory or URL with a manifest (`store_reader.is_store`); anything else is text.
* Splits: `holdout` document names override `holdout_fraction` (it is 0 when names are given); a
  `validation_fraction` of the rest is kept for model selection (token stores only); the rest is training.
  The fractions are drawn with `split_seed`, never with `seed` (which orders the rows): runs that differ only
  in `seed` hold out and validate on the same documents.
* Rows: training rows are `loader.training_data`'s (text through `loader.build_corpus`, stores through
  `store_reader.training_rows` with these splits); `evaluation_rows` are the first rows of the held-out
  documents (every document when none is held out); `calibration_rows` come from the training documents (or
  the validation ones, to rank candidates).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from minitron_jax.core.errors import DataError
from minitron_jax.data.store_reader import (
    HOLDOUT,
    TRAIN,
    Splits,
    calibration_rows,
    data_label,
    is_store,
    parse_blend,
    split_rows,
    split_token_docs,
    store_weights,
    tokenizer_dir_of,
    training_rows,
)
from minitron_jax.data.text import (
    load_samples,
    pack,
    parse_holdout,
    read_documents,
    split_documents,
    tokenize_documents,
)

TEXT, STORE, BLEND = "text", "store", "blend"


def with_split_seed(recorded: dict) -> dict:
    """Recorded settings (a run's recipe.json, a teacher-logits identity, a pipeline stage's) with their
    `split_seed`: those written before it existed drew their splits with `seed`, so that is theirs (a run with
    seed=0 then equals today's default split_seed=0)."""
    if "split_seed" in recorded or "seed" not in recorded:
        return recorded
    return {**recorded, "split_seed": recorded["seed"]}


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """`data` (a text path or `hf:` source, a token store, or a blend dict) and how its documents split.

    `holdout`: document names (one name, a comma list or a sequence; kept parsed). `holdout_fraction` is 0
    when names are given: the names override it, here and nowhere else. `split_seed` draws the fractions'
    documents; `seed` orders the rows (training order, the order held-out documents are packed in)."""

    data: Any
    holdout: tuple[str, ...] = ()
    holdout_fraction: float = 0.0
    validation_fraction: float = 0.0
    seed: int = 0
    text_field: str = "text"
    split_seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "holdout", tuple(parse_holdout(self.holdout)))
        if self.holdout:
            object.__setattr__(self, "holdout_fraction", 0.0)

    @classmethod
    def of_recipe(cls, rc) -> DataSpec:
        """The data of a run recipe (`train.run_config.RunConfig` or anything with its data fields)."""
        return cls(rc.data, holdout=rc.holdout, holdout_fraction=rc.holdout_fraction,
                   validation_fraction=rc.validation_fraction, seed=rc.seed, text_field=rc.text_field,
                   split_seed=rc.split_seed)

    @classmethod
    def of_splits(cls, data, splits: Splits | None, *, exclude=(), seed: int = 0, text_field: str = "text") -> DataSpec:
        """From `store_reader.Splits` (as `minitron score|prune` and the pipeline pass them; their seed is the
        split_seed), else from the names in `exclude` alone (no fraction to draw). `seed` orders the rows."""
        if splits is None:
            return cls(data, holdout=exclude, seed=seed, text_field=text_field)
        return cls(data, holdout=splits.holdout, holdout_fraction=splits.holdout_fraction,
                   validation_fraction=splits.validation_fraction, seed=seed, text_field=text_field,
                   split_seed=splits.seed)

    # ------------------------------------------------------------------ what the data is
    @functools.cached_property
    def kind(self) -> str:
        """TEXT, STORE or BLEND; a dict that is no valid blend is refused here (DataError)."""
        if parse_blend(self.data):
            return BLEND
        return STORE if is_store(self.data) else TEXT

    @property
    def is_text(self) -> bool:
        """Text to tokenize (not a token store or blend: those are read as they are)."""
        return self.kind == TEXT

    @property
    def weights(self) -> dict[str, float]:
        """{store: normalized weight} (one store: weight 1)."""
        return store_weights(self.data)

    @property
    def label(self) -> str:
        return data_label(self.data)

    # ------------------------------------------------------------------ splits
    @property
    def holds_out(self) -> bool:
        """Whether documents are held out (by name or by fraction)."""
        return bool(self.holdout) or bool(self.holdout_fraction)

    @functools.cached_property
    def splits(self) -> Splits:
        """The token-store splits (`store_reader.Splits`; refuses impossible fractions)."""
        return Splits(self.holdout, self.holdout_fraction, self.validation_fraction, self.split_seed)

    def split_text(self, docs) -> tuple[list, list]:
        """(training, held-out) of text documents [(name, text)] (`text.split_documents`; no held-out ones when
        nothing is held out)."""
        if not self.holds_out:
            return list(docs), []
        return split_documents(docs, self.holdout, self.holdout_fraction, self.split_seed)

    # ------------------------------------------------------------------ rows
    def training_rows(self, seq_len: int, *, packing: str = "concat", pad_id: int = 0, vocab_size: int | None = None):
        """(rows, stream) of a store or blend (`store_reader.training_rows` over the training documents)."""
        return training_rows(self.data, seq_len, packing=packing, splits=self.splits, seed=self.seed, pad_id=pad_id,
                             vocab_size=vocab_size)

    def held_out_rows(self, seq_len: int, samples: int, *, vocab_size: int | None = None,
                      what: str = "evaluation") -> np.ndarray:
        """[samples, seq_len]: the first rows of a store's held-out documents (`store_reader.split_rows`)."""
        return split_rows(self.data, seq_len, samples, HOLDOUT, self.splits, seed=self.seed, vocab_size=vocab_size,
                          what=what)

    def evaluation_rows(self, tokenizer, seq_len: int, samples: int, *, vocab_size: int | None = None,
                        task_docs: int = 0) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """(rows [samples, seq_len], documents [(name, text)] for a next-line task): the first `samples` rows of
        the held-out documents packed in a seeded order (concat packing), every document when none is held out.

        Text: the held-out documents split off as training splits them, all returned. A store or blend: the rows
        `store_reader.split_rows` gives (the same rows as for the text it was tokenized from), and the decoded
        text of its first `task_docs` held-out documents; its tokenizer must be `tokenizer`'s (checked by sha256
        when it was loaded from a directory). The validation split plays no part."""
        if self.is_text:
            docs = read_documents(self.data, self.text_field)  # read once; only the held-out documents are tokenized
            held_docs = self.split_text(docs)[1] if self.holds_out else docs
            rows = pack(tokenize_documents(held_docs, tokenizer, vocab_size=vocab_size), seq_len, None, self.seed)
            if len(rows) < samples:
                raise DataError(f"{self.data}: the held-out documents give {len(rows)} rows of {seq_len} tokens, fewer "
                                f"than the {samples} asked for; lower the sample count or seq_len, or hold out more "
                                f"documents")
            return np.asarray(rows[:samples]), held_docs
        splits = Splits(self.holdout, self.holdout_fraction, 0.0, self.split_seed)
        split = HOLDOUT if splits.active else TRAIN  # nothing held out: every document, as for text
        tok_dir = tokenizer_dir_of(tokenizer)
        rows = split_rows(self.data, seq_len, samples, split, splits, seed=self.seed, tokenizer_dir=tok_dir,
                          vocab_size=vocab_size)
        if not task_docs:
            return rows, []
        docs = split_token_docs(self.data, split, splits, max_docs=task_docs, tokenizer_dir=tok_dir)
        return rows, [(f"document {i}", tokenizer.decode(d, skip_special_tokens=True)) for i, d in enumerate(docs)]

    def calibration_rows(self, tokenizer, samples: int, seq_len: int, seed: int = 0, *, split: int = TRAIN,
                         vocab_size: int | None = None) -> np.ndarray:
        """[samples, seq_len] calibration rows drawn with `seed`: from text (`text.load_samples`, the held-out
        documents skipped), or from the documents of `split` of a store or blend (`store_reader.calibration_rows`;
        its tokenizer checked against `tokenizer`'s directory). Fractions and a split other than training need
        a store."""
        if not self.is_text:
            return calibration_rows(self.data, samples, seq_len, seed, split=split, splits=self.splits,
                                    tokenizer_dir=tokenizer_dir_of(tokenizer), vocab_size=vocab_size)
        if split or self.holdout_fraction or self.validation_fraction:
            raise DataError(f"holdout and validation fractions split token stores; {self.data} is text: tokenize it "
                            f"with `minitron tokenize {self.data} --tokenizer MODEL_DIR --out STORE`, or name held-out "
                            f"documents")
        return load_samples(self.data, tokenizer, samples, seq_len, seed, self.text_field, vocab_size=vocab_size,
                            exclude=self.holdout)
