"""Applications on top of the library: the model registry, the terminal chat and the demo."""
