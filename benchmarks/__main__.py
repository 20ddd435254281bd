"""Command line: ``python -m benchmarks all --device cpu|cuda [--quick|--tiny] [--only NAME]``."""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable, Sequence

import torch

from benchmarks import layers, module, reduced_vs_bruteforce, solver, sweep, tracker
from benchmarks.common import Profile, Settings, Table, environment, format_table, rows_for_json

BENCHMARKS: dict[str, Callable[[Settings], Table]] = {
    "layers": layers.run,
    "module": module.run,
    "solver": solver.run,
    "tracker": tracker.run,
    "reduced": reduced_vs_bruteforce.run,
    "sweep": sweep.run,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command-line options (see ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="mflightning vs plain PyTorch, measured side by side in one run.",
    )
    parser.add_argument("which", choices=["all", *BENCHMARKS], help="benchmark to run, or all")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repeats")
    size.add_argument("--tiny", action="store_true", help="CI smoke: minimal sizes, < 60 s")
    parser.add_argument(
        "--only", help=f"comma-separated subset of {', '.join(BENCHMARKS)} (with `all`)"
    )
    parser.add_argument("--repeats", type=int, help="timed samples per case (overrides profile)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (torch.set_num_threads)")
    parser.add_argument("--json", metavar="PATH", help="also write every row to this JSON file")
    args = parser.parse_args(argv)
    names = list(BENCHMARKS) if args.which == "all" else [args.which]
    if args.only:
        only = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(only) - set(BENCHMARKS))
        if unknown:
            parser.error(f"unknown --only {unknown}; choose from {list(BENCHMARKS)}")
        names = [n for n in names if n in only]
    args.names = names
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen benchmarks, print their tables, optionally dump the rows as JSON."""
    args = parse_args(argv)
    profile: Profile = "tiny" if args.tiny else "quick" if args.quick else "full"
    settings = Settings.make(args.device, profile)
    if args.repeats:
        settings = Settings(
            settings.device, profile, args.repeats, settings.warmup, settings.min_sample_ms
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    # the imported modules live until exit: frozen, they are skipped by the collection that
    # precedes every timed sample (a full collection of them costs ~0.3 s each time)
    gc.freeze()
    env = environment(settings)
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    tables = []
    for name in args.names:
        start = time.perf_counter()
        table = BENCHMARKS[name](settings)
        table.notes.append(f"({name}: {time.perf_counter() - start:.0f} s)")
        tables.append(table)
        print("\n" + format_table(table), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": env, "rows": rows_for_json(tables)}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
