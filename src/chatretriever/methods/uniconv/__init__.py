"""UniConv: one LLM that retrieves for a conversation and writes the grounded answer."""

SAVED_CONFIG = "uniconv.json"  # the file that makes a directory a saved UniConv
