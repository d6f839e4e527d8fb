"""Reading and writing models: safetensors, Hugging Face import/export, orbax model checkpoints, the prune record."""
