"""Parts of `encode_speed.py`: the encoder rows, the fp32 reference cache, the Faiss rows and the
report."""
