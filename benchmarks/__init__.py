"""Side-by-side benchmarks of mflightning against the plain-PyTorch code a user would write.

Run from the repository root::

    python -m benchmarks all --device cpu|cuda [--quick|--tiny] [--only NAME] [--json PATH]

Each benchmark measures ours and its baseline in one process with interleaved repeats and prints
one Markdown table with the medians, the ratio ours / baseline and the target ratio. See
``docs/benchmarks.md`` for the measured tables.
"""
