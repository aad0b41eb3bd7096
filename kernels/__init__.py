"""The kernel lab: one command per kernel, `python -m kernels.NAME [--out DIR] [--ab COMMIT]` from the repo root (`make bench` runs
them all). Each writes a report folder (default reports/kernels/NAME) and exits nonzero when one of its checks fails; the shared
command line, the peak table and the A/B runner are in kernels/_lab.py."""
