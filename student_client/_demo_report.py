"""``edistill demo``'s report: accuracy statistics, the printed table, and ``demo.png`` when matplotlib is installed.

Private to :mod:`student_client.demo` (which re-exports :func:`format_report`).
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from student_client.demo import _RunResult

__all__ = ["format_report", "mean_std", "plot_runs"]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    import statistics

    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def plot_runs(path: pathlib.Path, runs: dict[str, list[_RunResult]], live: list[tuple[float, int]],
              marks: list[tuple[float, str]]) -> str | None:
    """Accuracy curves over a strip of live teachers, saved to ``path``; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax, strip) = plt.subplots(2, 1, figsize=(7.5, 6), height_ratios=[3, 1.2])
    colours = {"hard labels": "tab:gray", "distilled": "tab:blue", "distilled, labelled inputs only": "tab:orange"}
    for label, results in runs.items():
        for i, r in enumerate(results):
            steps, accs = zip(*r.curve)
            ax.plot(steps, accs, color=colours.get(label), alpha=0.8, label=label if i == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("test accuracy")
    ax.set_title("edistill demo: students on sklearn digits (one line per seed)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if live:
        t, n = zip(*live)
        strip.step(t, n, where="post", color="tab:green")
        strip.set_ylim(0, max(n) + 1)
        for when, what in marks:
            strip.axvline(when, color="tab:red" if "SIGKILL" in what else "tab:purple", ls="--", lw=1)
            strip.annotate(what, (when, 0.3), rotation=90, fontsize=7, ha="right", va="bottom")
    strip.set_xlabel("seconds since the teachers started")
    strip.set_ylabel("live teachers\n(in the registry)")
    strip.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def format_report(report: dict[str, Any]) -> str:
    """The table ``edistill demo`` prints."""
    lines = [
        "",
        f"edistill demo — {report['dataset']}; {report['labelled_samples']} labelled samples, "
        f"{report['steps_per_run']} steps per student, {report['seeds']} seeds, "
        f"T={report['temperature']:g}, CE weight={report['ce_weight']:g}",
        "",
        f"  {'model':<52} {'test accuracy':>16}",
        f"  {'-' * 52} {'-' * 16}",
        f"  {'teacher (MLP 256x2, all labels)':<52} {report['teacher_accuracy'] * 100:>15.1f}%",
    ]
    for label, row in report["rows"].items():
        name = f"student (MLP 32), {label}"
        lines.append(f"  {name:<52} {row['mean'] * 100:>8.1f} ± {row['std'] * 100:4.1f}%")
    lines += [
        "",
        f"  teachers seen: {report['teachers_seen']}   failovers: {report['failovers']}   "
        f"batches lost: {report['batches_lost']}   duplicated: {report['batches_duplicated']}",
    ]
    for event in report["events"]:
        lines.append(f"  event: {event}")
    plot = report.get("plot")
    lines.append(f"  plot: {plot}" if plot else
                 f"  plot: not written (install matplotlib: pip install 'edistill[plot]'); "
                 f"it would be {report['out_dir']}/demo.png")
    lines.append(f"  report: {report['out_dir']}/report.json   ({report['seconds']} s)")
    return "\n".join(lines)
