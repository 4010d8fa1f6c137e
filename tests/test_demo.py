"""``edistill demo`` end to end: a run with a killed teacher checked batch by batch (partial epochs
included), the headline (distilled beats hard labels), the PNG, and life without matplotlib."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from student_client.cli import main
from student_client.demo import DemoConfig, format_report, run_demo
from student_client.errors import ConfigError, StudentError
from tests.helpers.teacher_proc import REPO_ROOT

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The --fast demo (2 seeds, 15 teacher epochs) with 130 steps: the kill at step 65 falls in
# the second of 3 complete epochs of the killed run (40 batches each), and 10 batches of a
# fourth follow, cut short by the step budget, so both kinds of epoch are checked.
_FAULT_RUN = dict(steps=130, eval_every_steps=65, progress=False)
# The plot-only run below: one seed, no fault, as small as still draws curves.
_SMALL = dict(seeds=1, steps=40, teacher_epochs=5, eval_every_steps=10)
# Distilled beats hard labels on each seed by more than this (test accuracy points). The
# runs are seeded and, on a given machine, deterministic: seeds 0 and 1 gain 7.2 and 13.1
# points here (hard 81.7 / 73.0 %, distilled 88.9 / 86.1 %). At this short budget the gain
# is not universal (seed 2 ties at 82.6 %, seed 3 gains 2.4); at the demo's 400 steps the
# README reports 87.1 ± 0.9 % vs 94.3 ± 0.4 % over 3 seeds.
_MARGIN_POINTS = 3.0


def test_demo_with_a_killed_teacher_loses_nothing_and_distilled_beats_hard_labels(tmp_path) -> None:
    report = run_demo(DemoConfig.fast(out_dir=str(tmp_path), **_FAULT_RUN))

    assert any(e.startswith("SIGKILLed teacher") for e in report["events"])
    (killed,) = [d for d in report["delivery"] if d["fault"]]
    assert (killed["run"], killed["seed"]) == ("distilled", 0)
    # Checked per run, every epoch, the last one cut short by the step budget too.
    assert [(d["lost"], d["duplicated"]) for d in report["delivery"]] == [(0, 0)] * 4, report["delivery"]
    # The killed run completed: every step, its epochs (the kill inside one) and the partial last one.
    assert (killed["epochs_complete"], killed["partial_batches"]) == (3, 10), killed
    assert killed["samples"] == 3 * 1257 + 10 * 32
    assert report["batches_lost"] == 0 and report["batches_duplicated"] == 0
    assert json.loads((tmp_path / "report.json").read_text())["delivery"] == report["delivery"]

    hard, distilled = report["rows"]["hard labels"], report["rows"]["distilled"]
    gains = [100 * (d - h) for d, h in zip(distilled["runs"], hard["runs"])]
    assert len(gains) == 2 and min(gains) > _MARGIN_POINTS, (
        f"distilled {distilled['mean']:.1%} ± {distilled['std']:.1%} vs hard labels {hard['mean']:.1%} ± "
        f"{hard['std']:.1%} (2 seeds), gains per seed {gains}")

    png = tmp_path / "demo.png"
    assert report["plot"] == str(png)
    data = png.read_bytes()
    assert data.startswith(_PNG_MAGIC) and len(data) > 10_000  # a real image, not an empty canvas
    text = format_report(report)
    assert f"plot: {png}" in text and "batches lost: 0" in text and "duplicated: 0" in text


# Runs the real CLI with every ``import matplotlib`` failing, as on a machine
# where the optional extra is not installed.
_NO_MATPLOTLIB = textwrap.dedent("""
    import importlib.abc, sys

    class _NoMatplotlib(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "matplotlib" or name.startswith("matplotlib."):
                raise ImportError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, _NoMatplotlib())
    from student_client import demo
    from student_client.cli import main

    demo.DemoConfig.fast = classmethod(lambda cls, **kw: cls(**{**%r, **kw, "seeds": 1}))
    sys.exit(main(sys.argv[1:]))
""")


def test_demo_without_matplotlib_runs_and_says_where_the_plot_would_be(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _NO_MATPLOTLIB % _SMALL, "demo", "--fast", "--out", str(tmp_path), "--no-progress",
         "--teachers", "1", "--no-fault"],  # the fault is covered above; here only the plot matters
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "plot: not written (install matplotlib" in out
    assert f"it would be {tmp_path}/demo.png" in out
    assert "batches lost: 0" in out and "duplicated: 0" in out
    assert not (tmp_path / "demo.png").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["plot"] is None and report["batches_lost"] == 0 and report["batches_duplicated"] == 0


@pytest.mark.parametrize("flag", ["--seeds", "--teachers"])
def test_demo_rejects_zero_seeds_or_teachers_in_one_line(flag, capsys) -> None:
    with pytest.raises(ConfigError, match=f"{flag[2:]} must be >= 1, got 0"):
        DemoConfig(**{flag[2:]: 0})
    # The demo command quiets these loggers; give later tests their levels back.
    levels = {name: logging.getLogger(name).level for name in ("student_client", "registry", "teacher_server",
                                                                "matplotlib")}
    try:
        assert main(["demo", "--fast", "--no-progress", flag, "0"]) == 2
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    err = capsys.readouterr().err.strip()
    assert err == f"edistill demo: error: {flag[2:]} must be >= 1, got 0"


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_demo_with_an_unreachable_registry_fails_in_one_line_and_leaves_no_teacher(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "student_client.cli", "demo", "--fast", "--no-progress", "--out", str(tmp_path),
         "--registry", "redis://:Pa55-w0rd@127.0.0.1:1/0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("edistill demo: error: ") and "redis://:***@127.0.0.1:1/0" in lines[0]
    assert "Pa55-w0rd" not in proc.stderr + proc.stdout
    assert _processes_mentioning(str(tmp_path)) == []  # teachers carry the checkpoint path in their argv


def test_fleet_reports_an_early_exit_and_stops_every_teacher_it_launched(tmp_path) -> None:
    import torch

    from registry import EmbeddedRedis
    from student_client.demo import _TeacherFleet
    from teacher_server.zoo import mlp
    from tests.helpers.redis_proc import pid_alive, wait_until

    good = tmp_path / "teacher.pt"
    torch.save(mlp(hidden=8).state_dict(), good)
    with EmbeddedRedis(password="Pa55-w0rd") as redis:
        fleet = _TeacherFleet(tmp_path / "missing.pt", 8, redis.url, tmp_path)
        launched = []
        launch = fleet._launch

        def launch_then_fix_checkpoint():
            teacher = launch()  # the first teacher gets a missing checkpoint and exits with code 2
            launched.append(teacher)
            fleet.checkpoint = good  # the second one is healthy
            return teacher

        fleet._launch = launch_then_fix_checkpoint
        try:
            with pytest.raises(StudentError) as info:
                fleet.start_many(2)
            message = str(info.value)
            assert "exited with code 2 before it was ready" in message and "missing.pt" in message
            assert f"full log: {tmp_path / 'teacher-1.log'}" in message
            assert "\n" not in message and "did not print its ready line" not in message
            assert fleet.procs == launched and len(launched) == 2
            for p in launched:  # the registry URL (with its password) is not on a command line
                assert not any("Pa55-w0rd" in arg or "--registry" in arg for arg in p.argv)
        finally:
            fleet.stop_all()
        assert all(p.returncode is not None for p in launched)
        wait_until(lambda: not any(pid_alive(p.pid) for p in launched), what="every teacher to exit")
