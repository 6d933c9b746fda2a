"""Every results table of a leaves.csv as Markdown (`reteq tables`): what docs/results_smol.md quotes, generated.

A design run slice by slice over several sessions has no single store and so no single report.html; its one
record is the merged leaves.csv (reteq.analysis.leaves). This module renders that file's tables as Markdown, one
file (docs/results_smol/tables.md), so a results page quotes generated rows instead of pasting analysis output,
and a test can check that every row it quotes is still what the data says (tests/test_results_smol.py).

The statistics are reteq.analysis.recency_stats' (per-p Student-t intervals, paired tests of the last p, equal
forgetting); this module only chooses rows and formats them. Numbers are rounded as a reader compares them:
forget scores to 3 decimals with their 95% half-width, drops and utilities to 2, p-values to 2 significant
digits (the sign-flip test's to 3, so its floor 0.0625 reads exactly).
"""

from __future__ import annotations

import itertools

import polars as pl

from reteq.analysis import recency_stats as RS
from reteq.analysis.leaves import START_CHECKPOINT
from reteq.analysis.paper_numbers import ALGORITHM_LABEL, algorithm_label

COLUMNS = ("method", "p", "seed", "lr", "status", "forget_score", "label_logp_start", "label_logp_end",
           "paraphrase_logp_start", "paraphrase_logp_end", "tofu_logp_start", "tofu_utility", "math_acc_start",
           "math_acc_end")  # what the tables read; a file without one of them is refused by name
PAPER_METHODS = tuple(ALGORITHM_LABEL)  # Table 1's methods, laid out as the paper lays them out (p down, method across)


def done_leaves(leaves: pl.DataFrame) -> pl.DataFrame:
    """The leaves that finished (status done); a collapsed run has no comparable final score."""
    return leaves.filter(pl.col("status") == "done")


def method_order(methods) -> list[str]:
    """The paper's methods first, in its order, then the others by name."""
    present = set(methods)
    return [m for m in PAPER_METHODS if m in present] + sorted(present - set(PAPER_METHODS))


def counts_line(leaves: pl.DataFrame) -> str:
    """The one-line summary of a leaves.csv: its design (methods grouped by their seeds and lrs, counting only
    complete cells: a (method, lr, seed) with every p) and how often the last-learned order forgets least."""
    done = done_leaves(leaves)
    last = done["p"].max()
    n_p = done.group_by("method", "lr", "seed").agg(pl.col("p").n_unique().alias("n_p"))
    complete = done.join(n_p.filter(pl.col("n_p") == last), on=["method", "lr", "seed"])
    cells = complete.group_by("method", "lr", "seed").agg(
        (pl.col("forget_score").filter(pl.col("p") == last).first() == pl.col("forget_score").min()).alias("last"))
    means = complete.group_by("method", "lr", "p").agg(pl.col("forget_score").mean())
    settings = means.group_by("method", "lr").agg(
        (pl.col("forget_score").filter(pl.col("p") == last).first() == pl.col("forget_score").min()).alias("last"))
    # methods grouped by their design: the seeds of each lr (a slice may have run some seeds of an lr so far)
    designs: dict[tuple, list[str]] = {}
    for method in sorted(complete["method"].unique()):
        mine = cells.filter(pl.col("method") == method)
        seeds_per_lr = tuple(sorted((lr, mine.filter(pl.col("lr") == lr).height) for lr in mine["lr"].unique()))
        designs.setdefault(seeds_per_lr, []).append(method)
    groups = "; ".join(f"{', '.join(ms)} at {_design(d)}" for d, ms in sorted(
        designs.items(), key=lambda kv: (-len(kv[0]), -sum(n for _, n in kv[0]))))
    return (f"leaves.csv: {done.height} leaves, p 1..{last}, {complete.height} of them in complete cells: {groups}; "
            f"p = {last} forgets least in {cells['last'].sum()} of {cells.height} cells (method x lr x seed) and has "
            f"the lowest seed mean in {settings['last'].sum()} of {settings.height} settings (method x lr)")


def _design(seeds_per_lr: tuple[tuple[float, int], ...]) -> str:
    """'5 seeds x 3 lrs (0.0001, 0.0003, 0.001)' when every lr has the same seeds, else each lr with its seeds:
    '5 seeds at 0.001, 2 seeds at 0.0003' (most seeds first)."""
    counts = {n for _, n in seeds_per_lr}
    if len(counts) == 1:
        return f"{counts.pop()} seeds x {len(seeds_per_lr)} lrs ({', '.join(f'{lr:g}' for lr, _ in seeds_per_lr)})"
    return ", ".join(f"{n} seeds at {lr:g}" for lr, n in sorted(seeds_per_lr, key=lambda x: (-x[1], x[0])))


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def _cell(mean: float | None, high: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.3f}" if high is None else f"{mean:.3f} ± {high - mean:.3f}"


def _bold_lowest(cells: list[str], means: list[float | None]) -> list[str]:
    known = [(m, i) for i, m in enumerate(means) if m is not None]
    if known:
        i = min(known)[1]
        cells[i] = f"**{cells[i]}**"
    return cells


def _ps(leaves: pl.DataFrame) -> list[int]:
    return sorted(done_leaves(leaves)["p"].unique().to_list())


def start_table(leaves: pl.DataFrame) -> str:
    """Per p: what the start checkpoints measured before unlearning (each checkpoint once, however many leaves
    started from it): math accuracy, and the log-prob a token of the forget label, of its paraphrases and of the
    TOFU answers (how strongly each order holds what unlearning will push on: the label-strength confound)."""
    measures = ("math_acc_start", "label_logp_start", "paraphrase_logp_start", "tofu_logp_start")
    starts = (leaves.sort("method", "lr").unique(START_CHECKPOINT, keep="first", maintain_order=True)
              .group_by("p").agg(pl.col(*measures).mean(), pl.len().alias("n")).sort("p"))
    rows = [[str(r["p"]), str(r["n"]), *(f"{r[m]:.3f}" for m in measures)] for r in starts.iter_rows(named=True)]
    return table(["p", "start checkpoints", "math accuracy before unlearning", "label log-prob",
                  "paraphrase log-prob", "TOFU answer log-prob"], rows)


def paper_layout_table(leaves: pl.DataFrame) -> str | None:
    """Table 1 as the paper lays it out: p down, (method, lr) across, seed mean ± 95% t half-width, the lowest of
    each column in bold; the paper's methods only (None when the file has none)."""
    part = done_leaves(leaves).filter(pl.col("method").is_in(PAPER_METHODS))
    if not part.height:
        return None
    iv = RS.per_p_intervals(part)
    columns = [(m, lr) for m in method_order(part["method"].unique())
               for lr in sorted(part.filter(pl.col("method") == m)["lr"].unique())]
    ps = _ps(part)
    grid = {}
    for m, lr in columns:
        mine = iv.filter((pl.col("method") == m) & (pl.col("lr") == lr))
        means = [_one(mine.filter(pl.col("p") == p), "mean") for p in ps]
        cells = [_cell(mean, _one(mine.filter(pl.col("p") == p), "ci_high")) for p, mean in zip(ps, means)]
        grid[m, lr] = _bold_lowest(cells, means)
    rows = [[str(p), *(grid[c][i] for c in columns)] for i, p in enumerate(ps)]
    return table(["p", *(f"{algorithm_label(m)} {lr:g}" for m, lr in columns)], rows)


def tests_table(leaves: pl.DataFrame) -> str:
    """Per (method, lr): the seeds paired, the largest paired-t and exact sign-flip p-values of the last p against
    every other p, and whether the last p is below every other p (each paired mean difference < 0 at t p < 0.05)."""
    tests = RS.recency_tests(done_leaves(leaves))
    rows = []
    for m in method_order(tests["method"].unique()):
        for lr in sorted(tests.filter(pl.col("method") == m)["lr"].unique()):
            t = tests.filter((pl.col("method") == m) & (pl.col("lr") == lr))
            rows.append([algorithm_label(m), f"{lr:g}", str(t["n_pairs"].min()), _p(t["t_pvalue"].max(), ".2g"),
                         _p(t["signflip_pvalue"].max(), ".3g"), "yes" if t["last_below_all"][0] else "no"])
    last = _ps(leaves)[-1]
    return table(["method", "lr", "pairs (min)", f"largest paired-t p over p = 1..{last - 1}", "exact sign-flip p",
                  f"p = {last} below every other p (paired t p < 0.05)"], rows)


def forget_table(leaves: pl.DataFrame, lr: float) -> str:
    """At one lr, per method: seed mean ± 95% t half-width of the final forget score per p (lowest in bold), the
    cells (seeds with every p) in which the last p forgets least, and the last p minus each other p paired by seed
    (mean difference; negative = the last-learned order forgot less) with its two-sided paired-t p-value."""
    part = done_leaves(leaves).filter(pl.col("lr") == lr)
    iv, tests, ps = RS.per_p_intervals(part), RS.recency_tests(part), _ps(part)
    last = ps[-1]
    rows = []
    for m in method_order(part["method"].unique()):
        mine = iv.filter(pl.col("method") == m)
        means = [_one(mine.filter(pl.col("p") == p), "mean") for p in ps]
        cells = _bold_lowest([_cell(mean, _one(mine.filter(pl.col("p") == p), "ci_high"))
                              for p, mean in zip(ps, means)], means)
        seeds = part.filter(pl.col("method") == m).group_by("seed").agg(
            pl.col("p").n_unique().alias("n_p"),
            (pl.col("forget_score").filter(pl.col("p") == last).first() == pl.col("forget_score").min()).alias("least"))
        complete = seeds.filter(pl.col("n_p") == len(ps))
        t = tests.filter(pl.col("method") == m).sort("other_p")
        diffs = " / ".join(f"{r['mean_diff']:+.2f} ({_p(r['t_pvalue'], '.2g')})" for r in t.iter_rows(named=True))
        rows.append([algorithm_label(m), *cells, f"{complete['least'].sum()} of {complete.height}", diffs or "–"])
    others = " / ".join(str(p) for p in ps[:-1])
    return table(["method", *(f"p = {p}" for p in ps), f"p = {last} least (cells)",
                  f"p = {last} minus p = {others}, paired t p"], rows)


def equal_forgetting_table(leaves: pl.DataFrame, target: float = RS.EQUAL_FORGETTING_TARGET) -> str:
    """Per method: the lr at which the first p's seed mean reaches `target` (interpolated in log(lr)) and every p's
    seed mean there, the lowest in bold; else why there is none (one lr, never reached, above at the smallest)."""
    done = done_leaves(leaves)
    equal = RS.equal_forgetting(done, target)
    ps = _ps(done)
    rows = []
    for m in method_order(equal["method"].unique()):
        r = equal.filter(pl.col("method") == m).row(0, named=True)
        if r["lr_at_target"] is None:
            rows.append([algorithm_label(m), _why_not(done.filter(pl.col("method") == m), target),
                         *("–" for _ in ps)])
            continue
        scores = [r.get(f"score_p{p}") for p in ps]
        cells = _bold_lowest([f"{s:.2f}" if s is not None else "–" for s in scores], scores)
        rows.append([algorithm_label(m), f"{r['lr_at_target']:.2e}", *cells])
    return table(["method", f"lr where p = {ps[0]} reaches {float(target)}", *(f"p = {p}" for p in ps)], rows)


def _why_not(mine: pl.DataFrame, target: float) -> str:
    first = mine["p"].min()
    curve = mine.filter(pl.col("p") == first).group_by("lr").agg(pl.col("forget_score").mean()).sort("lr")
    lrs = ", ".join(f"{x:g}" for x in curve["lr"])
    if curve.height == 1:
        return f"one lr so far ({lrs})"
    if curve["forget_score"][0] >= target:
        return f"already above at the smallest lr ({curve['forget_score'][0]:.2f} at {curve['lr'][0]:g})"
    return f"not reached: p = {first}'s largest seed mean over {lrs} is {curve['forget_score'].max():.2f}"


def drops_table(leaves: pl.DataFrame) -> str:
    """Per (method, lr), seed means: the drop of the label's and of the paraphrases' log-prob a token per p (before
    minus after; positive = forgot), and the TOFU utility and math accuracy change at the first and last p."""
    part = done_leaves(leaves)
    ps = _ps(part)
    ends = (ps[0], ps[-1])
    means = _with_drops(part).with_columns(
        (pl.col("math_acc_end") - pl.col("math_acc_start")).alias("math_change"),
    ).group_by("method", "lr", "p").agg(pl.col("label_drop", "paraphrase_drop", "tofu_utility", "math_change").mean())
    rows = []
    for m in method_order(part["method"].unique()):
        for lr in sorted(means.filter(pl.col("method") == m)["lr"].unique()):
            mine = means.filter((pl.col("method") == m) & (pl.col("lr") == lr))
            rows.append([algorithm_label(m), f"{lr:g}", _joined(mine, "label_drop", ps),
                         _joined(mine, "paraphrase_drop", ps), _joined(mine, "tofu_utility", ends),
                         _joined(mine, "math_change", ends)])
    every, first_last = " / ".join(str(p) for p in ps), f"{ends[0]} / {ends[1]}"
    return table(["method", "lr", f"label drop p = {every}", f"paraphrase drop p = {every}",
                  f"TOFU utility p = {first_last}", f"math acc change p = {first_last}"], rows)


def last_two_table(leaves: pl.DataFrame) -> str:
    """Per (method, lr): the last two orders (p = 3 and 4 in the paper's design) compared on each part of the
    forget score, paired by seed. They start with paraphrases about equally strong and labels closer together than
    any other pair of orders (start_table), so where the last p still drops its paraphrases less, the difference is
    not their starting strength (the label-strength confound, for the paraphrases)."""
    done = _with_drops(done_leaves(leaves))
    ps = _ps(done)
    before, last = ps[-2], ps[-1]
    rows = []
    for m in method_order(done["method"].unique()):
        for lr in sorted(done.filter(pl.col("method") == m)["lr"].unique()):
            mine = done.filter((pl.col("method") == m) & (pl.col("lr") == lr))
            pairs = (mine.filter(pl.col("p") == last).select("seed", "label_drop", "paraphrase_drop")
                     .join(mine.filter(pl.col("p") == before).select("seed", "label_drop", "paraphrase_drop"),
                           on="seed", suffix="_before"))
            if not pairs.height:
                continue
            cells = []
            for part in ("paraphrase_drop", "label_drop"):
                diffs = (pairs[part] - pairs[f"{part}_before"]).to_list()
                _, p_value = RS.paired_t(diffs)
                cells += [f"{pairs[f'{part}_before'].mean():.2f} / {pairs[part].mean():.2f}",
                          f"{sum(diffs) / len(diffs):+.2f} ({_p(p_value, '.2g')})",
                          f"{sum(d < 0 for d in diffs)} of {len(diffs)}"]
            rows.append([algorithm_label(m), f"{lr:g}", *cells])
    pair, diff = f"p = {before} / {last}", f"p = {last} minus p = {before}, paired t p"
    return table(["method", "lr", f"paraphrase drop {pair}", diff, f"seeds where p = {last} dropped less",
                  f"label drop {pair}", diff, f"seeds where p = {last} dropped less"], rows)


def identical_pairs_table(leaves: pl.DataFrame) -> str | None:
    """Pairs of methods whose leaves are bit-identical wherever both ran (same lr, p, seed): a method that reduces
    to another at its defaults (GradDiff to GA at retain weight 0), so a determinism check, not new evidence."""
    done = done_leaves(leaves)
    rows = []
    for a, b in itertools.combinations(method_order(done["method"].unique()), 2):
        pairs = (done.filter(pl.col("method") == a).select("lr", "p", "seed", pl.col("forget_score").alias("a"))
                 .join(done.filter(pl.col("method") == b).select("lr", "p", "seed", pl.col("forget_score").alias("b")),
                       on=["lr", "p", "seed"]))
        if pairs.height and (pairs["a"] - pairs["b"]).abs().max() == 0:
            lrs = ", ".join(f"{x:g}" for x in sorted(pairs["lr"].unique()))
            rows.append([algorithm_label(b), algorithm_label(a), lrs, str(pairs.height)])
    if not rows:
        return None
    return table(["method", "same final forget score as", "at lrs", "(lr, p, seed) pairs compared"], rows)


def _with_drops(leaves: pl.DataFrame) -> pl.DataFrame:
    """label_drop and paraphrase_drop per leaf: log-prob a token before minus after (positive = forgot)."""
    return leaves.with_columns(
        (pl.col("label_logp_start") - pl.col("label_logp_end")).alias("label_drop"),
        (pl.col("paraphrase_logp_start") - pl.col("paraphrase_logp_end")).alias("paraphrase_drop"))


def _joined(per_p: pl.DataFrame, column: str, ps) -> str:
    """'0.44 / 0.33 / 0.38 / 0.42': `column` at each p of `ps`, 2 decimals ('–' where that p has no row)."""
    values = [_one(per_p.filter(pl.col("p") == p), column) for p in ps]
    return " / ".join("–" if v is None else f"{v:.2f}" for v in values)


def _p(value: float | None, spec: str) -> str:
    """A p-value as the tables print it; '–' where there is none (one pair, or no spread)."""
    return "–" if value is None or value != value else format(value, spec)


def _one(frame: pl.DataFrame, column: str) -> float | None:
    return frame[column][0] if frame.height else None


def render(leaves: pl.DataFrame, source: str, target: float = RS.EQUAL_FORGETTING_TARGET) -> str:
    """The whole Markdown file: every table above, per lr where a table is per lr."""
    lrs = sorted(done_leaves(leaves)["lr"].unique())
    last = _ps(leaves)[-1]
    parts = [
        f"# Every table of {source}",
        f"Written by `reteq tables {source}` from that file alone (reteq.analysis.leaves_markdown): do not edit; "
        "rerun it after each merge. Forget score: mean log-prob a token of the forget label and its paraphrases "
        "before minus after unlearning (higher = more forgetting); ± is the 95% Student-t half-width over seeds; "
        "paired tests pair by seed and are two-sided, uncorrected for the comparisons of a setting.",
        "## Counts", counts_line(leaves),
        "## Before unlearning (per start checkpoint)", start_table(leaves),
    ]
    paper = paper_layout_table(leaves)
    if paper is not None:
        parts += ["## Table 1 layout (the paper's methods)", paper]
    parts += [f"## Paired tests of p = {last} against every other p", tests_table(leaves),
              f"## Equal forgetting (forget score {float(target)})", equal_forgetting_table(leaves, target)]
    for lr in lrs:
        parts += [f"## Forget scores at lr {lr:g}", forget_table(leaves, lr)]
    parts += ["## Label and paraphrase drops (nats a token), utility", drops_table(leaves),
              f"## The last two orders, part by part (p = {last - 1} against p = {last})", last_two_table(leaves)]
    identical = identical_pairs_table(leaves)
    if identical is not None:
        parts += ["## Methods identical to another at their defaults", identical]
    return "\n\n".join(parts) + "\n"


def table_rows(markdown: str) -> list[str]:
    """The body rows of every Markdown table in `markdown` (header and separator rows left out)."""
    lines = markdown.splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.startswith("|") or set(line.replace("|", "").strip()) <= set("-: "):
            continue
        if i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            continue  # a header
        rows.append(line.strip())
    return rows
