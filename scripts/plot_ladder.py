"""plot_ladder.py: how much the n-gram mixers earn as the model gets stronger, from compare_mixers.sh logs.

    python3 scripts/plot_ladder.py logs/prose50_*.txt logs/prose200_*.txt logs/prose800*_*.txt [--out F.png]

Each log is one run. Runs are grouped into rungs by the tokens they trained on (steps run x
TRAIN_BATCH_TOKENS) and into variants by their mixer settings: `none`, `hedge`, or `learned` with
`+prior<beta>` (NGRAM_PRIOR_BETA), `+orders<min>-<max>` where the orders are not the default 2-7, and
`+oracle<N>` where NGRAM_ORACLE_TOKENS is not the rung's none run's. Runs of one rung and variant
with different seeds are averaged.
Every rung needs its `none` run: the gain is the variant's final val_bpb below the none run's, and
the neural cost is its own neural-only sliding score above the none run's (the price of training
with the mixer's loss); the cache's share is the cache pass's time over the neural sliding pass's
(`eval_phases`), what the mixing adds to the evaluation.

Prints a Markdown table (one row per rung and variant), then, unless --table, draws two panels
into a PNG: final val_bpb against training tokens, and the gain over none against training tokens,
log-scaled tokens, one line per variant. matplotlib is optional, as for plot_run.py: without it the
table is printed and the script exits with code 2 saying how to install it.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from plot_run import load_pyplot, save_png  # noqa: E402  (needs scripts/ on sys.path)
from run_log import LogError, RunSummary, parse_log  # noqa: E402

NEURAL_SCORE = "final_sliding_window_exact"  # the model alone, in every mixer run and in none's


@dataclass(frozen=True)
class Cell:
    """One rung and variant: its runs' mean scores."""
    tokens: int
    variant: str
    runs: int
    neural_bpb: float
    final_bpb: float
    cache_share: float | None  # cache ms / neural ms, None without a cache or an eval_phases line


def variant_of(run: RunSummary, oracle_tokens: str | None = None) -> str:
    """The mixer settings that tell two runs of one rung apart, as a short name; `oracle_tokens` is the
    NGRAM_ORACLE_TOKENS the rung's other runs use."""
    s = run.settings
    mixer = s.get("USE_MIXER", "learned")
    if mixer != "learned":
        return mixer
    name = "learned"
    if float(s.get("NGRAM_PRIOR_BETA", "0")) > 0:
        name += f"+prior{float(s['NGRAM_PRIOR_BETA']):g}"
    orders = (s.get("NGRAM_MIN_ORDER", "2"), s.get("NGRAM_MAX_ORDER", "7"))
    if orders != ("2", "7"):
        name += f"+orders{orders[0]}-{orders[1]}"
    if s.get("NGRAM_ORACLE_TOKENS") != oracle_tokens:
        name += f"+oracle{s.get('NGRAM_ORACLE_TOKENS', '?')}"
    return name


def training_tokens(run: RunSummary) -> int:
    if run.steps is None or not run.settings.get("TRAIN_BATCH_TOKENS", "").isdigit():
        raise LogError(f"{run.path}: no train_done line or TRAIN_BATCH_TOKENS setting: not a training run")
    return run.steps * int(run.settings["TRAIN_BATCH_TOKENS"])


def ladder_cells(runs: list[RunSummary]) -> list[Cell]:
    """The mean neural and final val_bpb of each (rung, variant), rungs by tokens, none first in each."""
    groups: dict[tuple[int, str], list[RunSummary]] = defaultdict(list)
    for run in runs:
        if NEURAL_SCORE not in run.evaluations:
            raise LogError(f"{run.path}: no `{NEURAL_SCORE}` line: not a sliding-window evaluation")
    rungs = [(training_tokens(run), run) for run in runs]
    oracle_of_rung = {t: r.settings.get("NGRAM_ORACLE_TOKENS") for t, r in rungs if variant_of(r) == "none"}
    for tokens, run in rungs:
        groups[tokens, variant_of(run, oracle_of_rung.get(tokens))].append(run)
    mean = lambda values: sum(values) / len(values)
    shares = lambda group: [r.eval_phases_ms["cache"] / r.eval_phases_ms["neural"] for r in group
                            if r.eval_phases_ms.get("cache") and r.eval_phases_ms.get("neural")]
    cells = [Cell(tokens, variant, len(group), mean([r.evaluations[NEURAL_SCORE].val_bpb for r in group]),
                  mean([r.val_bpb for r in group]), mean(shares(group)) if shares(group) else None)
             for (tokens, variant), group in groups.items()]
    return sorted(cells, key=lambda c: (c.tokens, c.variant != "none", c.variant))


def baselines(cells: list[Cell]) -> dict[int, Cell]:
    """Each rung's none cell; a rung without one cannot say what its mixers gain."""
    base = {c.tokens: c for c in cells if c.variant == "none"}
    missing = sorted({c.tokens for c in cells} - set(base))
    if missing:
        raise LogError(f"no USE_MIXER=none run for the rung(s) of {', '.join(f'{t:,}' for t in missing)} training "
                       f"tokens: the gain is measured against it (compare_mixers.sh MODES=none)")
    return base


def ladder_table(cells: list[Cell]) -> str:
    base = baselines(cells)
    lines = ["| training tokens | variant | runs | neural-only bpb | final bpb | gain over none | neural cost | "
             "cache / neural pass |", "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        b = base[c.tokens]
        share = "-" if c.cache_share is None else f"{100 * c.cache_share:.1f}%"
        lines.append(f"| {c.tokens:,} | {c.variant} | {c.runs} | {c.neural_bpb:.4f} | {c.final_bpb:.4f} | "
                     f"{b.final_bpb - c.final_bpb:+.4f} | {c.neural_bpb - b.neural_bpb:+.4f} | {share} |")
    return "\n".join(lines)


def draw_ladder(plt, cells: list[Cell]):
    base = baselines(cells)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, variant in enumerate(sorted({c.variant for c in cells}, key=lambda v: (v != "none", v))):
        mine = [c for c in cells if c.variant == variant]
        xs, style = [c.tokens for c in mine], dict(marker="o", label=variant, color=f"C{i}")  # one colour per variant
        left.plot(xs, [c.final_bpb for c in mine], **style)
        if variant != "none":
            right.plot(xs, [base[c.tokens].final_bpb - c.final_bpb for c in mine], **style)
    for ax, label in ((left, "final val_bpb"), (right, "gain over none (bpb)")):
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
    figure.tight_layout()
    return figure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", help="train_gpt.py logs of compare_mixers.sh runs")
    parser.add_argument("--out", default="ladder.png", help="PNG to write (default ladder.png)")
    parser.add_argument("--table", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    try:
        cells = ladder_cells([parse_log(path) for path in args.logs])
        print(ladder_table(cells))
    except LogError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.table:
        return 0
    plt = load_pyplot()
    if plt is None:
        print("error: plot_ladder.py needs matplotlib to draw, which is not installed: pip install matplotlib "
              "(or --table)", file=sys.stderr)
        return 2
    figure = draw_ladder(plt, cells)
    try:
        save_png(figure, Path(args.out))
    finally:
        plt.close(figure)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
