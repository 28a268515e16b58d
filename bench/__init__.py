"""`make bench`: how much the service costs over calling the pipeline directly, how it scales with
concurrent clients, how fast one API process answers, and a GPU script for the SD 1.5 architecture.

Run with `python -m bench` (see `python -m bench --help`); results go to `docs/bench/*.json` and
the tables in `docs/benchmarks.md`.
"""
