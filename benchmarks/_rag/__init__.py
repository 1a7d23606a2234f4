"""The parts of benchmarks/rag.py: the evaluated turns and the searched corpus (`turns`), the
answer cache (`answers`), the markdown table and the plot (`report`)."""
