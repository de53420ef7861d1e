"""`memtune report`: a markdown table and plots from experiment runs.

Learning (accuracy on the learned facts at the end, on each chunk's at the end, right after
each chunk, and on their paraphrases), forgetting (known-fact accuracy change, held-out
perplexity change, drift, and any extra probes, each against the base model), and cost
(training time, peak memory, trainable parameters). Plots: learning and forgetting curves over
the stream (the first chunk's accuracy too: what later chunks overwrite), and the
learning-versus-forgetting frontier across every run given.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from memtune.errors import MemtuneError
from memtune.io import RESULTS, atomic_dir

log = logging.getLogger(__name__)


@dataclass
class RunRecord:
    name: str
    path: Path
    results: dict
    probes: list[dict]  # probe events from metrics.jsonl, in stream order

    @property
    def method(self) -> str:
        return self.results.get("method", "?")


def find_runs(paths: list[str]) -> list[RunRecord]:
    """Run folders (with results.json) given directly or inside experiment folders."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / RESULTS).is_file():
            found.append(p)
        elif p.is_dir():
            inner = sorted(d for d in p.iterdir() if (d / RESULTS).is_file())
            if not inner:
                raise MemtuneError(f"{str(p)!r} holds no finished run (no */{RESULTS}): run `memtune experiment` first")
            found += inner
        else:
            raise MemtuneError(f"run folder {str(p)!r} does not exist")
    runs = []
    prefix = len(paths) > 1 and len({p.parent for p in found}) > 1  # name runs of several experiments apart
    for d in found:
        results = json.loads((d / RESULTS).read_text())
        probes = []
        metrics = d / "metrics.jsonl"
        if metrics.is_file():
            probes = [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("event") == "probe"]
        name = f"{d.parent.name}/{d.name}" if prefix else d.name
        runs.append(RunRecord(name, d, results, probes))
    return runs


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _delta_pts(x: float | None, base: float | None) -> str:
    return "–" if x is None or base is None else f"{100 * (x - base):+.1f}"


def _delta_rel(x: float | None, base: float | None) -> str:
    return "–" if x is None or not base else f"{100 * (x / base - 1):+.2f}%"


def _by_chunk(xs: list[float | None] | None) -> str:
    """Accuracy on each chunk at the end, first chunk first: "70 / 78 / 94"."""
    return "–" if not xs else " / ".join("–" if x is None else f"{100 * x:.0f}" for x in xs)


def _extra_keys(runs: list[RunRecord]) -> list[str]:
    return sorted({k for r in runs for k in r.results if k.split(":")[0] in ("qa", "choice", "answer-loss")})


def _extra_value(value) -> float | None:
    return value.get("f1") if isinstance(value, dict) else value


def table(runs: list[RunRecord]) -> str:
    """The markdown table: one row per run, plus the base model."""
    extras = _extra_keys(runs)
    head = ["run", "method", "learned %", "learned, immediate %", "learned by chunk %", "paraphrases %", "known Δ pts",
            "perplexity Δ", "drift KL", *[f"{k} Δ" for k in extras], "train time", "peak RSS MiB", "params updated"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = runs[0].results.get("base", {})
    base_cells = ["base model", "–", _pct(base.get("learning")), "–", "–", _pct(base.get("paraphrases")),
                  f"({_pct(base.get('known'))} %)" if base.get("known") is not None else "–",
                  f"({base['perplexity']:.3f})" if base.get("perplexity") else "–", "0",
                  *[f"({_extra_value(base.get(k)):.3f})" if base.get(k) is not None else "–" for k in extras],
                  "–", "–", "–"]
    lines.append("| " + " | ".join(base_cells) + " |")
    for r in runs:
        x, b = r.results, r.results.get("base", {})
        cells = [r.name, r.method, _pct(x.get("learning")), _pct(x.get("learning_immediate")),
                 _by_chunk(x.get("learning_by_chunk")), _pct(x.get("paraphrases")), _delta_pts(x.get("known"), b.get("known")),
                 _delta_rel(x.get("perplexity"), b.get("perplexity")),
                 "–" if x.get("drift") is None else f"{x['drift']:.4f}"]
        for k in extras:
            v, bv = _extra_value(x.get(k)), _extra_value(b.get(k))
            cells.append("–" if v is None or bv is None else f"{v - bv:+.3f}")
        cells += [f"{x.get('train_time_s', 0) / 60:.1f} min", f"{x.get('peak_rss_mb', 0):.0f}",
                  f"{x.get('updated_parameters', x.get('trainable_parameters', 0)):,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def run_colors(runs: list[RunRecord]) -> dict[str, object]:
    """A color per run: its method's hue (smf blue, full red, lora orange), and when a method
    has several runs, one shade of that hue per run, from light to dark in the given order."""
    from matplotlib import colormaps

    palette = {"smf": ("tab:blue", "Blues"), "full": ("tab:red", "Reds"), "lora": ("tab:orange", "Oranges")}
    colors: dict[str, object] = {}
    for method in dict.fromkeys(r.method for r in runs):
        names = [r.name for r in runs if r.method == method]
        color, shades = palette.get(method, ("tab:gray", "Greys"))
        if len(names) == 1:
            colors[names[0]] = color
        else:
            cmap = colormaps[shades]
            colors |= {name: cmap(0.45 + 0.5 * i / (len(names) - 1)) for i, name in enumerate(names)}
    return colors


def _probed(event: dict, key: str) -> float | None:
    """A probe event's value; "first chunk": right after it, then as later chunks are learned."""
    if key != "first chunk":
        return event.get(key)
    if event.get("chunk") == 1:
        return event.get("immediate")
    return (event.get("learning_by_chunk") or [None])[0]


def plot_curves(runs: list[RunRecord], path: Path) -> None:
    """Learning and forgetting over the stream: one panel per measured quantity."""
    plt = _pyplot()
    panels = [("learning", "accuracy on what was learned so far (%)", 100),
              ("first chunk", "accuracy on the first chunk learned (%)", 100),
              ("known", "known-fact accuracy (%)", 100), ("perplexity", "held-out perplexity", 1)]
    panels = [p for p in panels if any(_probed(e, p[0]) is not None for r in runs for e in r.probes)]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 4), squeeze=False)
    colors = run_colors(runs)
    styles = ["-", "--", ":", "-."]
    for ax, (key, label, scale) in zip(axes[0], panels):
        for i, r in enumerate(runs):
            points = [(e["seen"], scale * _probed(e, key)) for e in r.probes if _probed(e, key) is not None]
            base = r.results.get("base", {}).get(key)
            if base is not None:
                points = [(0, scale * base), *points]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, styles[i % len(styles)], marker="o", color=colors[r.name], label=r.name)
        ax.set_xlabel("items learned")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def label_offsets(names: list[str], at: list[tuple[float, float]], size: float = 7) -> list[tuple[float, float]]:
    """Offsets (in points) for labels `names` of points at `at` (display positions, in points):
    each label starts up and right of its point and moves up until it overlaps no label placed
    before it (lowest first), so that close points stay readable."""
    height, char = size * 1.3, size * 0.62
    placed: list[tuple[float, float, float]] = []  # left, right, bottom of each placed label
    offsets: list[tuple[float, float]] = [(0.0, 0.0)] * len(names)
    for i in sorted(range(len(names)), key=lambda i: at[i][1]):
        (x, y), dy = at[i], 3.0
        left, right = x + 4, x + 4 + char * len(names[i])
        while any(left < r and l < right and abs(y + dy - b) < height for l, r, b in placed):
            dy += height
        placed.append((left, right, y + dy))
        offsets[i] = (4.0, dy)
    return offsets


def plot_frontier(runs: list[RunRecord], path: Path) -> None:
    """Each run at the end of the stream: learned (x) against what was lost (y)."""
    plt = _pyplot()
    use_known = all(r.results.get("known") is not None for r in runs)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    colors = run_colors(runs)
    points = []
    for r in runs:
        x, b = r.results, r.results.get("base", {})
        if x.get("learning") is None:
            continue
        if use_known:
            y = 100 * (b["known"] - x["known"])
        elif x.get("perplexity") and b.get("perplexity"):
            y = 100 * (x["perplexity"] / b["perplexity"] - 1)
        else:
            continue
        ax.scatter(100 * x["learning"], y, color=colors[r.name], s=40)
        points.append((r.name, 100 * x["learning"], y))
    ax.autoscale_view()
    at = ax.transData.transform([(px, py) for _, px, py in points]) * 72 / fig.dpi if points else []
    names = [name for name, _, _ in points]
    for (name, px, py), offset in zip(points, label_offsets(names, [tuple(a) for a in at])):
        lead = dict(arrowstyle="-", lw=0.5, color="gray") if offset[1] > 3 else None  # moved: a line to its point
        ax.annotate(name, (px, py), fontsize=7, xytext=offset, textcoords="offset points", arrowprops=lead)
    ax.set_xlabel("learned (%)")
    ax.set_ylabel("known-fact accuracy lost (points)" if use_known else "held-out perplexity increase (%)")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_title("learning vs forgetting (lower right is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(paths: list[str], out: str | Path) -> Path:
    """Write report.md, curves.png and frontier.png into `out` (replaced atomically)."""
    runs = find_runs(paths)
    with atomic_dir(out, overwrite=True) as tmp:
        plot_curves(runs, tmp / "curves.png")
        plot_frontier(runs, tmp / "frontier.png")
        text = ["# memtune report", "", f"Runs: {', '.join(str(r.path) for r in runs)}", "",
                ("Accuracies: the greedy answer contains the reference answer or an alias. Δ: against the base "
                 "model (its own values in brackets). Perplexity and drift: held-out text. Params updated: for "
                 "SMF the value-table rows that ever changed × their width; otherwise every trainable parameter."), "",
                table(runs), "", "![learning and forgetting over the stream](curves.png)", "",
                "![learning vs forgetting](frontier.png)", ""]
        (tmp / "report.md").write_text("\n".join(text))
    log.info("report of %d runs written to %s", len(runs), out)
    return Path(out)
