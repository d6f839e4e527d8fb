"""Text readers, Hugging Face sources, packing, the token store, tokenization, store reading, row sources,
the data spec (what `data` is and how it splits), the loader."""
