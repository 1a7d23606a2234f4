"""The parts of benchmarks/rag.py: the evaluated turns and the searched corpus (`turns`), the rows
and how each retrieves and answers (`systems`), the workspace with the answering models
(`workspace`), the answer cache (`answers`), the metrics and paired tests (`evaluation`), the
markdown table and the plot (`report`)."""
