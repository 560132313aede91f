"""What the notes' benches share: a plain-text table, and a line saying what machine ran them."""

import os
import platform
from collections.abc import Sequence


def table(title: str, header: list[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain-text table: the first column left-aligned, the figures right-aligned."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        padded = [
            c.ljust(w) if j == 0 else c.rjust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(padded))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def machine(*packages: str) -> str:
    """CPUs, CPU model, Python, then the given "name version" strings."""
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else platform.machine()
    return ", ".join(
        [f"{os.cpu_count()} CPUs ({cpu})", f"Python {platform.python_version()}", *packages]
    )
