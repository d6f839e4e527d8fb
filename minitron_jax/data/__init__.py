"""Text readers, Hugging Face sources, packing, the token store, tokenization, store reading, the loader."""
