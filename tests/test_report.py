"""`trainsup report`: the Figure's own artists (every stop by cause, every checkpoint, the
timeline by category, the loss of the final history), the files it writes, and bad input."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from matplotlib.collections import PolyCollection  # noqa: E402

from supervisor import report  # noqa: E402
from supervisor.accounting import account  # noqa: E402
from supervisor_helpers import CLI, REPO, env  # noqa: E402
from test_accounting import eventful_run  # noqa: E402


def by_gid(fig, prefix: str) -> list:
    return [a for ax in fig.axes for a in ax.get_children() if (a.get_gid() or "").startswith(prefix)]


def test_every_stop_checkpoint_and_category_is_drawn(tmp_path):
    eventful_run(tmp_path)  # a crash past the last checkpoint, an OOM back-off, heat, sleep, SIGTERM
    acc = account(tmp_path, live=False)
    fig = report.figure(tmp_path, acc)
    by_step, by_time, timeline = fig.axes[:3]

    # each stop: a line on the step axis at its step, and one on the time axis at its time
    stops = {(a.get_gid(), a.get_xdata()[0]) for a in by_gid(fig, "stop:") if a.axes is by_step}
    assert stops == {("stop:crash:8", 8), ("stop:oom:9", 9), ("stop:thermal:10", 10), ("stop:sleep:12", 12),
                     ("stop:preempt:16", 16)}
    on_time = sorted(a.get_xdata()[0] for a in by_gid(fig, "stop:") if a.axes is by_time)
    assert on_time == pytest.approx([t / 60 for t in (9.8, 16.5, 23.5, 29.5, 133.2)])  # minutes from the start
    colors = {a.get_gid().split(":")[1]: a.get_color() for a in by_gid(fig, "stop:")}
    assert len(set(colors.values())) == 5  # one colour per cause
    assert {t.get_text() for t in by_step.get_legend().get_texts()} >= {
        "stop: crash", "stop: oom", "stop: thermal", "stop: sleep", "stop: preempt", "checkpoint", "train loss"}

    ticks = sorted(int(a.get_gid().split(":")[1]) for a in by_gid(fig, "checkpoint:") if a.axes is by_step)
    assert ticks == [5, 10, 12, 16, 20]

    # the loss over steps is the final history: steps 1..20 once each (6-9 were run three times)
    [loss] = [a for a in by_gid(fig, "loss") if a.axes is by_step]
    assert list(loss.get_xdata()) == list(range(1, 21))
    # over time every record shows, a line per attempt: 8 + 4 + 11 + 4 step records
    assert sorted(len(a.get_xdata()) for a in by_gid(fig, "loss") if a.axes is by_time) == [4, 4, 8, 11]

    # the timeline: one bar collection per category that took time, its widths summing to that time
    bars = {a.get_gid(): a for a in timeline.get_children() if isinstance(a, PolyCollection)
            and a.get_gid()}
    assert set(bars) == {"training", "saving", "exit", "restart", "recomputed", "paused", "waiting", "asleep"}
    for category, seconds in (("training", acc.productive_s), ("asleep", acc.asleep_s),
                              ("recomputed", acc.lost_s["recomputed"]), ("paused", acc.lost_s["paused"])):
        widths = sum(p.vertices[:, 0].max() - p.vertices[:, 0].min() for p in bars[category].get_paths())
        assert widths * 60 == pytest.approx(seconds, abs=1e-6), category
    assert "goodput 0.46" in fig._suptitle.get_text()


def test_cli_writes_a_readable_png_and_a_self_contained_html(tmp_path):
    run_dir = tmp_path / "run"
    eventful_run(run_dir)
    proc = subprocess.run([*CLI, "report", str(run_dir)], env=env(), capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    html_path, png_path = (Path(p) for p in proc.stdout.split())
    assert (html_path, png_path) == (run_dir / "report.html", run_dir / "report.png")
    from matplotlib.image import imread

    img = imread(png_path)
    assert img.shape[0] > 500 and img.shape[1] > 800  # a picture, decoded
    html = html_path.read_text()
    assert base64.b64encode(png_path.read_bytes()).decode() in html  # the picture inside, nothing linked
    assert "crash" in html and "recomputed" in html and "goodput 0.46" in html
    for path in (html_path, png_path):
        assert os.stat(path).st_mode & 0o077 == 0  # a run dir's files are private

    out = tmp_path / "elsewhere" / "r.html"
    out.parent.mkdir()
    proc = subprocess.run([*CLI, "report", str(run_dir), "-o", str(out)], env=env(), capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.split() == [str(out), str(out.with_suffix(".png"))]


def test_a_run_without_metrics_still_gets_its_timeline(tmp_path):
    run_dir = tmp_path / "run"
    eventful_run(run_dir)
    (run_dir / "metrics.jsonl").unlink()
    fig = report.figure(run_dir)
    by_step, by_time, timeline = fig.axes[:3]
    assert not [a for a in by_step.get_lines() if a.get_gid() == "loss"]
    assert any("no metrics yet" in t.get_text() for t in by_step.texts)
    assert {a.get_gid() for a in timeline.get_children() if a.get_gid()} >= {"restart", "asleep"}
    report.write(run_dir)
    assert (run_dir / "report.png").stat().st_size > 0


def test_an_empty_run_dir_draws_and_says_so(tmp_path):
    fig = report.figure(tmp_path)
    assert "no training recorded yet" in fig._suptitle.get_text()


def test_without_matplotlib_exit_2_with_the_install_line(tmp_path):
    eventful_run(tmp_path / "run")
    blocker = tmp_path / "block"
    (blocker / "matplotlib").mkdir(parents=True)
    (blocker / "matplotlib" / "__init__.py").write_text("raise ImportError('matplotlib blocked by the test')\n")
    e = env()
    e["PYTHONPATH"] = f"{blocker}{os.pathsep}{e['PYTHONPATH']}"
    proc = subprocess.run([*CLI, "report", str(tmp_path / "run")], env=e, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pip install 'trainsup[plot]'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "report.html").exists()


def test_bad_targets(tmp_path):
    proc = subprocess.run([*CLI, "report", str(tmp_path / "nope")], env=env(), capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 2 and "nope" in proc.stderr
    eventful_run(tmp_path / "run")
    proc = subprocess.run([*CLI, "report", str(tmp_path / "run"), "-o", str(tmp_path / "no" / "dir" / "r.html")],
                          env=env(), capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "no such directory" in proc.stderr
    png = tmp_path / "r.png"  # the PNG goes beside the HTML: one name for both would overwrite
    proc = subprocess.run([*CLI, "report", str(tmp_path / "run"), "-o", str(png)], env=env(), capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 2 and "r.html" in proc.stderr and not png.exists()


def test_hostile_files_are_skipped_not_a_traceback(tmp_path):
    run_dir = tmp_path / "run"
    eventful_run(run_dir)
    with open(run_dir / "events.jsonl", "a") as f:
        f.write("[" * 20000 + "\n" + '{"ts": 1' + "0" * 400 + ', "event": "checkpoint", "step": 3}\n')
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "step": 99, "ts": 1' + "0" * 400 + "}\n")
    (run_dir / "checkpoints" / "step-00000099" / "manifest.json").mkdir(parents=True)  # a directory
    proc = subprocess.run([*CLI, "report", str(run_dir)], env=env(), capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    proc = subprocess.run([*CLI, "status", str(run_dir)], env=env(), capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "goodput:         0.458" in proc.stdout, proc.stdout + proc.stderr


def test_the_supervisor_cli_does_not_import_matplotlib():
    code = "import sys, supervisor.cli; assert 'matplotlib' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], env=env(), check=True, cwd=REPO)
