"""Plot HdrHistogram .hgrm percentile distributions, HdrHistogram-style.

The x axis is 1/(1-percentile) on a log scale, labelled as percentiles
(50%, 90%, 99%, ...); the y axis is latency. One line per input file.
"""

import argparse
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FixedFormatter  # noqa: E402


def parse_hgrm(path):
    """Returns [(value, percentile)] rows of an .hgrm file (percentile in 0..1)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3 or line.startswith("#"):
                continue
            try:
                value, pct = float(parts[0]), float(parts[1])
            except ValueError:
                continue
            rows.append((value, pct))
    if not rows:
        raise ValueError(f"{path}: no percentile rows")
    return rows


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-o", "--output", required=True, help="PNG to write")
    ap.add_argument("--title", default="switchyard latency by percentile")
    ap.add_argument("--unit", default="µs", help="unit of the .hgrm values")
    ap.add_argument("--log-y", action="store_true", help="log-scale latency axis")
    ap.add_argument("files", nargs="+", help="file.hgrm or file.hgrm=label")
    args = ap.parse_args(argv)

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    max_x = 10.0
    for spec in args.files:
        path, _, label = spec.partition("=")
        rows = parse_hgrm(path)
        xs, ys = [], []
        for value, pct in rows:
            if pct >= 1.0:
                continue
            xs.append(1.0 / (1.0 - pct))
            ys.append(value)
        if rows[-1][1] >= 1.0 and xs:
            # The max: draw it one decade past the last finite point.
            xs.append(xs[-1] * 10)
            ys.append(rows[-1][0])
        max_x = max(max_x, xs[-1] if xs else 10.0)
        ax.plot(xs, ys, label=label or path, linewidth=1.6)

    ax.set_xscale("log")
    if args.log_y:
        ax.set_yscale("log")
    ticks = [1, 2, 10, 100, 1000, 10000, 100000, 1000000]
    labels = ["0%", "50%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"]
    keep = [i for i, t in enumerate(ticks) if t <= max_x * 1.01]
    ax.xaxis.set_major_locator(FixedLocator([ticks[i] for i in keep]))
    ax.xaxis.set_major_formatter(FixedFormatter([labels[i] for i in keep]))
    ax.xaxis.set_minor_locator(FixedLocator([]))
    ax.set_xlim(1, max_x)
    ax.set_xlabel("percentile")
    ax.set_ylabel(f"latency ({args.unit})")
    ax.set_title(args.title)
    ax.grid(True, which="major", alpha=0.35)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main(sys.argv[1:])
