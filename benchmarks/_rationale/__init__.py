"""Helpers of benchmarks/rationale.py (imported with the script's folder on sys.path)."""
