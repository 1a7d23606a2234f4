"""Parts of `generate_speed.py`: the summary and the report."""
