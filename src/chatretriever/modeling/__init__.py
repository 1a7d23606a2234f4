"""Shared model machinery: offline backbones, the chat template and special tokens, collation and
attention masks, shared losses, the generic trainer and recipes. Imports only the core below it."""
