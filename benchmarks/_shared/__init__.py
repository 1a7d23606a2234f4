"""Helpers every benchmark script shares, by concern.

    machine   where a benchmark ran (CPU model, threads, library versions), recorded with timings
    options   argparse types of numeric options (`at_least(1)`, `above_zero`)
    paths     default paths resolved against the repository root (not the current directory);
              a run's settings (`run_settings`), and earlier results made with other settings
              kept aside rather than replaced (`keep_previous`): every script that writes results

The scripts put benchmarks/ on sys.path, so these import as `_shared.<module>`.
"""
