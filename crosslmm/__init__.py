"""CrossLMM's tools: everything that does not ship inside a checkpoint (commands, training, sample builders)."""
