"""The model: LlamaConfig, sharding rules, attention, the forward function, losses."""
