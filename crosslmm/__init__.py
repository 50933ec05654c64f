"""CrossLMM's tools: serving, evaluation and the other commands that do not ship with a checkpoint."""
