"""The report of benchmarks/lowdata.py: every saved run listed, per size the mean ± standard deviation over
the subsets every listed system finished, the first system minus each other one paired by subset, and the
plot (results.md, bleu_vs_size.png)."""

from __future__ import annotations

from pathlib import Path

METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    import statistics

    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _pm(mean: float, sd: float | None, scale: float = 1.0, digits: int = 1, sign: str = "") -> str:
    text = f"{mean * scale:{sign}.{digits}f}"
    return text + (f" ± {sd * scale:.{digits}f}" if sd is not None else "")


def report(root: Path, results: list[dict], systems: list[str]) -> dict:
    """results.md (every run; mean ± sd over the subsets every listed system finished; the first system
    minus each other, paired by subset) and the BLEU plot with error bars."""
    import matplotlib

    from prefixtune.files import atomic_write

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {(r["system"], r["size"], r["subset"]): r for r in results}
    shown = systems + sorted({s for s, _, _ in runs} - set(systems))  # unlisted systems: in the run table only
    cells = sorted({(size, subset) for _, size, subset in runs})
    rows = [
        "## Every run: test BLEU (device of the run)",
        "",
        "| train size | subset | " + " | ".join(shown) + " |",
        "|---|---|" + "---|" * len(shown),
    ]
    for size, subset in cells:
        entries = [runs.get((s, size, subset)) for s in shown]
        text = [f"{100 * r['bleu']:.1f} ({r.get('device', 'cpu').split(':')[0]})" if r else "–" for r in entries]
        rows.append(f"| {size} | {subset} | " + " | ".join(text) + " |")
    # means only over the (size, subset) cells that every listed system finished: like against like
    complete = [(size, subset) for size, subset in cells if all((s, size, subset) in runs for s in systems)]
    rows += [
        "",
        f"## Mean ± standard deviation over the subsets that {', '.join(systems)} all finished",
        "",
        "| system | train size | subsets | BLEU | NIST | METEOR | ROUGE-L | CIDEr | best dev loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if not complete:
        rows.append(f"| (no training size has a subset that {', '.join(systems)} all finished yet) |||||||||")
    stats = {}
    for size in sorted({size for size, _ in complete}):
        for system in systems:
            rs = [runs[(system, size, subset)] for sz, subset in complete if sz == size]
            m = {k: _mean_sd([r[k] for r in rs]) for k in (*METRICS, "best_dev_loss")}
            stats[(system, size)] = m
            rows.append(
                f"| {system} | {size} | {', '.join(str(sub) for sz, sub in complete if sz == size)} | "
                f"{_pm(*m['bleu'], 100)} | {_pm(*m['nist'], digits=2)} | {_pm(*m['meteor'], 100)} | "
                f"{_pm(*m['rouge_l'], 100)} | {_pm(*m['cider'], digits=2)} | {_pm(*m['best_dev_loss'], digits=3)} |"
            )
    paired = _paired(runs, systems)
    if paired:
        first, others = systems[0], systems[1:]
        rows += [
            "",
            f"## {first} minus each other system, paired by subset (test BLEU points; mean ± sd over the subsets "
            "both finished)",
            "",
            "| train size | " + " | ".join(f"vs {o}" for o in others) + " |",
            "|---|" + "---|" * len(others),
        ]
        for size in sorted({size for _, size in paired}):
            text = []
            for other in others:
                diffs = paired.get((other, size), {})
                each = ", ".join(f"{sub}: {d:+.1f}" for sub, d in diffs.items())
                text.append(f"{_pm(*_mean_sd(list(diffs.values())), sign='+')} (subset {each})" if diffs else "–")
            rows.append(f"| {size} | " + " | ".join(text) + " |")
    title = "# Low-data E2E: test scores of the dev-selected model (benchmarks/lowdata.py)\n\n"
    text = title + "\n".join(rows) + "\n"
    atomic_write(root / "results.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    sizes = sorted({size for _, size, _ in runs})
    for k, system in enumerate(shown):
        color, shift = f"C{k}", 1 + 0.03 * (k - (len(shown) - 1) / 2)  # side by side on the log axis
        points = sorted((size, m["bleu"]) for (s, size), m in stats.items() if s == system)
        if points:
            xs = [size * shift for size, _ in points]
            ys = [100 * mean for _, (mean, _) in points]
            err = [100 * (sd or 0.0) for _, (_, sd) in points]
            ax.errorbar(xs, ys, yerr=err, fmt="o-", color=color, capsize=3, label=system)
        singles = [(size * shift, 100 * r["bleu"]) for (s, size, _), r in runs.items() if s == system]
        if singles:
            ax.scatter(*zip(*singles), s=10, alpha=0.45, color=color, label=None if points else system)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(size) for size in sizes])
    ax.minorticks_off()
    ax.set_xlabel("E2E training examples")
    ax.set_ylabel("test BLEU")
    ax.set_title("lines: mean ± sd over subsets all finished; dots: single runs", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(root / "bleu_vs_size.png", lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    summary = {"benchmark": "lowdata", "runs": len(runs)}
    for (s, size), m in stats.items():
        summary[f"{s}_{size}_bleu"] = round(m["bleu"][0] * 100, 2)
        summary[f"{s}_{size}_bleu_sd"] = None if m["bleu"][1] is None else round(m["bleu"][1] * 100, 2)
    for (o, size), diffs in paired.items():
        mean, sd = _mean_sd(list(diffs.values()))
        summary[f"{systems[0]}_minus_{o}_{size}_bleu"] = round(mean, 2)
        summary[f"{systems[0]}_minus_{o}_{size}_bleu_sd"] = None if sd is None else round(sd, 2)
    return summary


def _paired(runs: dict, systems: list[str]) -> dict[tuple[str, int], dict[int, float]]:
    """(other system, size) -> {subset: BLEU of the first system minus the other's}, subsets both finished."""
    first, paired = systems[0], {}
    for (system, size, subset), r in sorted(runs.items(), key=lambda item: (item[0][1], item[0][2])):
        mine = runs.get((first, size, subset))
        if system != first and system in systems and mine is not None:
            paired.setdefault((system, size), {})[subset] = 100 * (mine["bleu"] - r["bleu"])
    return paired
