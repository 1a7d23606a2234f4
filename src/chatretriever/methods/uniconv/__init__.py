"""UniConv: one LLM that retrieves for a conversation and writes the grounded answer."""
