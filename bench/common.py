"""Measurement helpers of the benchmarks: interleaved timing rounds, ratios, tables.

Benchmarks run on a GPU machine (see README, "Benchmarks"); they print a table and need no weights.
ComfyUI, the pack and the random models come from the harness (harness/host.py ``start_comfy``,
harness/models.py ``random_sd15``, ...).
"""
from __future__ import annotations

import statistics
import time

def timed_rounds(fns: dict, repeats: int = 7, warmup: int = 1, rotate: bool = False) -> dict[str, list[float]]:
    """Wall times of several functions measured in interleaved rounds (A B C, A B C, ...), so that
    clock and host drift hit all of them alike; with ``rotate`` each round starts one later (A B C, B C A,
    C A B, ...), so that no function always runs first or right after the same one. Returns
    {name: [seconds per round]}."""
    import torch
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        shift = r % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return times


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a_i / b_i."""
    return statistics.median(x / y for x, y in zip(a, b))


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    rows = [list(r) + [""] * (len(header) - len(r)) for r in rows]
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, r in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if k == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
