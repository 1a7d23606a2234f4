"""Parts of `encode_speed.py`: the Faiss rows and the report."""
