"""The encoder-agnostic retrieval pipeline: the Encoder protocol, encode, index, search, evaluate,
baselines and rewrite. Imports the core and `modeling`, never a method."""
