"""Training data every method shares: builders from public datasets and user files, hold-out splits,
BM25 hard negatives, synthetic ad-hoc pairs and teacher scores (the format is `io.training`)."""
