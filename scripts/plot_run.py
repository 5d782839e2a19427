"""plot_run.py: training curves of one or more train_gpt.py runs in one PNG.

    python3 scripts/plot_run.py logs/seed1.txt logs/seed2.txt [--out curves.png]

Four panels (2x2): train loss against step and against training time, validation bpb against step
and against training time; one line per log, labelled with the log's file name. Training time is
the train_time the log prints, which leaves out the time spent on periodic validation. The
validation curve is the periodic `step:N/ITER val_bpb:...` points plus, at the last step, the
float model's `prequant_plain` score: the same plain evaluation, so the curve runs to the end of
training even with VAL_LOSS_EVERY=0. The default --out is the first log's path with .png.

matplotlib is optional (it is not in requirements.txt): without it the script says how to
install it and exits with code 2. The PNG is written under a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from run_log import LogError, RunSummary, parse_log  # noqa: E402  (needs scripts/ on sys.path)

# (metric, x axis) of each panel, in subplot order: row 1 train loss, row 2 validation bpb.
PANELS = (("train_loss", "step"), ("train_loss", "time_s"), ("val_bpb", "step"), ("val_bpb", "time_s"))
AXIS_LABELS = {"train_loss": "train loss (nats)", "val_bpb": "validation bits per byte", "step": "step",
               "time_s": "training time (s, without validation)"}


def curve_points(run: RunSummary) -> dict[tuple[str, str], tuple[list[float], list[float]]]:
    """(metric, x axis) -> (xs, ys) of each panel for one run: exactly what gets plotted."""
    train_steps = [p.step for p in run.train_losses]
    train_times = [p.train_time_ms / 1000 for p in run.train_losses]
    train_losses = [p.train_loss for p in run.train_losses]
    val_steps = [p.step for p in run.val_points]
    val_times = [p.train_time_ms / 1000 for p in run.val_points]
    val_bpbs = [p.val_bpb for p in run.val_points]
    end = run.evaluations.get("prequant_plain")
    if end is not None and run.steps is not None and run.train_time_ms is not None:
        val_steps.append(run.steps)
        val_times.append(run.train_time_ms / 1000)
        val_bpbs.append(end.val_bpb)
    return {("train_loss", "step"): (train_steps, train_losses),
            ("train_loss", "time_s"): (train_times, train_losses),
            ("val_bpb", "step"): (val_steps, val_bpbs),
            ("val_bpb", "time_s"): (val_times, val_bpbs)}


def load_pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # no display is needed, or wanted, to write a PNG
    import matplotlib.pyplot as plt
    return plt


def draw_curves(plt, runs: list[RunSummary]):
    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    for run in runs:
        points = curve_points(run)
        for ax, panel in zip(axes.flat, PANELS):
            xs, ys = points[panel]
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=run.path.name)
    for ax, (metric, x_axis) in zip(axes.flat, PANELS):
        ax.set_xlabel(AXIS_LABELS[x_axis])
        ax.set_ylabel(AXIS_LABELS[metric])
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
    figure.tight_layout()
    return figure


def save_png(figure, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # same folder: the rename is atomic
    try:
        figure.savefig(temporary, format="png", dpi=100)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", help="train_gpt.py logs (logs/<RUN_ID>.txt)")
    parser.add_argument("--out", help="PNG to write (default: the first log's path with .png)")
    args = parser.parse_args(argv)
    try:
        runs = [parse_log(path) for path in args.logs]
    except LogError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plt = load_pyplot()
    if plt is None:
        print("error: plot_run.py needs matplotlib, which is not installed: pip install matplotlib", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.logs[0]).with_suffix(".png")
    figure = draw_curves(plt, runs)
    try:
        save_png(figure, out)
    finally:
        plt.close(figure)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
