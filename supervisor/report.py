"""The picture of a run: loss over steps and over wall time, every stop and restart by cause,
checkpoints as ticks, and under it the wall clock split by what it went to (`trainsup report`).

Drawn with matplotlib's object API (a Figure on the Agg canvas: no pyplot state, no GUI
backend); matplotlib is an optional extra, imported only here. The numbers come from
`supervisor.accounting` (the same accounting as `trainsup status`) and RUN_DIR/metrics.jsonl.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from pathlib import Path
from typing import Any

from supervisor.accounting import CATEGORIES, Accounting, account
from supervisor.cli.status import fmt_duration
from train_core.metricslog import METRICS_FILE, read_metrics
from train_core.runfiles import is_number, write_bytes_atomic

INSTALL = "pip install 'trainsup[plot]'"

# what the wall clock went to (accounting.CATEGORIES), and each stop's cause
CATEGORY_COLORS = {"training": "#2ca02c", "saving": "#1f77b4", "exit": "#7f7f7f", "restart": "#ff7f0e",
                   "recomputed": "#d62728", "paused": "#9467bd", "waiting": "#bcbd22", "asleep": "#c7c7c7"}
CAUSE_COLORS = {"preempt": "#1f77b4", "crash": "#d62728", "oom": "#ff7f0e", "hang": "#8c564b",
                "thermal": "#e377c2", "power": "#bcbd22", "sleep": "#7f7f7f", "shutdown": "#17becf",
                "other": "#000000"}


class MatplotlibMissing(RuntimeError):
    pass


def figure(run_dir: Path, acc: Accounting | None = None, metrics: list[dict[str, Any]] | None = None) -> Any:
    """The report's matplotlib Figure (not saved). Every stop is a vertical line with the gid
    "stop:<cause>:<step>", every checkpoint a tick with the gid "checkpoint:<step>", every
    timeline span a bar with the gid "<category>"."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MatplotlibMissing(f"trainsup report draws with matplotlib, which is not installed: {INSTALL}") from None
    acc = acc if acc is not None else account(run_dir)
    metrics = metrics if metrics is not None else read_metrics(run_dir / METRICS_FILE)
    t0 = acc.start_ts if acc.start_ts is not None else metrics[0]["ts"] if metrics else 0.0
    span = max((acc.end_ts or t0) - t0, 1.0)
    unit, scale = ("h", 3600.0) if span > 3 * 3600 else ("min", 60.0) if span > 180 else ("s", 1.0)

    fig = Figure(figsize=(11, 8.5), layout="constrained")
    by_step, by_time, timeline = fig.subplots(3, 1, height_ratios=[3, 3, 1.2])
    fig.suptitle(_title(run_dir, acc))

    final = _final_history(metrics)  # step -> the record that is in the final model's history
    for kind, key, style in (("step", "loss", dict(lw=1, color="#1f77b4", label="train loss")),
                             ("metrics", "val_loss", dict(lw=1.5, marker="o", ms=3, color="#d62728",
                                                          label="val loss"))):
        pts = sorted((s, r[key]) for s, rs in final.items() for r in rs
                     if r.get("kind") == kind and is_number(r.get(key)))
        if pts:
            by_step.plot(*zip(*pts), gid=key, **style)
        # every record, recomputed ones too (the time they took shows), a line per attempt
        by_attempt: dict[Any, list[tuple[float, float]]] = {}
        for r in metrics:
            if r.get("kind") == kind and is_number(r.get(key)):
                by_attempt.setdefault(r.get("attempt"), []).append(((r["ts"] - t0) / scale, r[key]))
        for i, timed in enumerate(by_attempt.values()):
            by_time.plot(*zip(*timed), gid=key, **(style if i == 0 else {**style, "label": None}))
    if not metrics:
        for ax in (by_step, by_time):
            ax.text(0.5, 0.5, "no metrics yet (RUN_DIR/metrics.jsonl)", ha="center", va="center",
                    transform=ax.transAxes, color="#7f7f7f")
    by_step.set_xlabel("step")
    by_time.set_xlabel(f"wall time ({unit})")
    for ax in (by_step, by_time):
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)

    seen: set[str] = set()
    for stop in acc.stops:
        cause = stop["cause"]
        label = f"stop: {cause}" if cause not in seen else None
        seen.add(cause)
        kw = dict(color=CAUSE_COLORS.get(cause, "#000000"), lw=1, ls="--", alpha=0.8)
        if stop.get("step") is not None:
            by_step.axvline(stop["step"], gid=f"stop:{cause}:{stop['step']}", label=label, **kw)
        by_time.axvline((stop["ts"] - t0) / scale, gid=f"stop:{cause}:{stop.get('step')}", **kw)
    for ckpt in acc.checkpoints:  # ticks along the bottom edge
        by_step.plot([ckpt["step"]], [0], marker="|", ms=10, color="#333333", transform=by_step.get_xaxis_transform(),
                     clip_on=False, gid=f"checkpoint:{ckpt['step']}")
        by_time.plot([(ckpt["ts"] - t0) / scale], [0], marker="|", ms=10, color="#333333",
                     transform=by_time.get_xaxis_transform(), clip_on=False, gid=f"checkpoint:{ckpt['step']}")
    if acc.checkpoints:
        by_step.plot([], [], marker="|", ls="", ms=10, color="#333333", label="checkpoint")
    if by_step.get_legend_handles_labels()[0]:
        by_step.legend(loc="upper right", fontsize="small")

    for cat in CATEGORIES:
        spans = [((a - t0) / scale, (b - a) / scale) for a, b, c in acc.segments if c == cat and b > a]
        if spans:
            timeline.broken_barh(spans, (0, 1), facecolors=CATEGORY_COLORS[cat], gid=cat,
                                 label=f"{cat} {fmt_duration(_seconds(acc, cat))}")
    timeline.set_yticks([])
    timeline.set_xlabel(f"wall time ({unit})")
    timeline.set_xlim(by_time.get_xlim() if metrics else (0, span / scale))
    if acc.segments:
        timeline.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=8, fontsize="small", frameon=False)
    return fig


def write(run_dir: Path, out: Path | None = None) -> tuple[Path, Path]:
    """Draw the report; write report.png and the self-contained report.html (the picture
    embedded) into the run dir, or `out` (HTML) and the PNG beside it. Returns both paths."""
    acc = account(run_dir)
    fig = figure(run_dir, acc)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    png = buf.getvalue()
    html_path = out if out is not None else run_dir / "report.html"
    png_path = html_path.with_suffix(".png")
    write_bytes_atomic(png_path, png)
    write_bytes_atomic(html_path, _html(run_dir, acc, png).encode())
    return html_path, png_path


def _final_history(metrics: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """For every step, the records that are in the final model's history: a session that starts
    at step S (its "start" record: a resume from S, or 0) runs the steps after S again, so what
    earlier sessions logged past S is dropped (from 0: everything, step 0's evaluation too)."""
    out: dict[int, list[dict[str, Any]]] = {}
    attempt = None  # of the last step record
    for rec in metrics:
        if rec["kind"] == "start":
            for step in [s for s in out if s > rec["step"] or rec["step"] == 0]:
                del out[step]
        elif rec["kind"] == "step":
            if attempt is not None and rec.get("attempt") != attempt:  # another attempt without its start record
                for step in [s for s in out if s >= rec["step"]]:
                    del out[step]
            attempt = rec.get("attempt")
        if rec["kind"] in ("step", "metrics"):
            out.setdefault(rec["step"], []).append(rec)
    return out


def _seconds(acc: Accounting, category: str) -> float:
    if category == "training":
        return acc.productive_s
    return acc.asleep_s if category == "asleep" else acc.lost_s.get(category, 0.0)


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _title(run_dir: Path, acc: Accounting) -> str:
    if acc.goodput is None:
        return f"{run_dir.name}: no training recorded yet"
    return (f"{run_dir.name}: goodput {acc.goodput:.2f} ({fmt_duration(acc.productive_s)} productive of "
            f"{fmt_duration(acc.wall_s - acc.asleep_s)}, {len(acc.stops)} stop(s))")


def _html(run_dir: Path, acc: Accounting, png: bytes) -> str:
    e = html.escape
    rows = "".join(f"<tr><td>{e(c)}</td><td>{fmt_duration(_seconds(acc, c))}</td></tr>" for c in CATEGORIES
                   if _seconds(acc, c))
    stops = "".join(f"<tr><td>{_when(s['ts'])}</td><td>{e(str(s.get('step')))}</td>"
                    f"<td>{e(s['cause'])}</td><td>{e(str(s.get('detail', '')))}</td></tr>" for s in acc.stops)
    img = base64.b64encode(png).decode()
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>trainsup report: {e(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:1em auto}}td,th{{padding:2px 10px;text-align:left}}</style>
</head><body>
<h1>{e(_title(run_dir, acc))}</h1>
<p>{e(str(run_dir))}</p>
<img alt="loss over steps and wall time, stops and checkpoints, the wall clock by use" src="data:image/png;base64,{img}">
<h2>Where the time went</h2><table><tr><th>what</th><th>time</th></tr>{rows}</table>
<h2>Stops</h2><table><tr><th>time</th><th>step</th><th>cause</th><th>detail</th></tr>{stops}</table>
</body></html>
"""
