"""``edistill demo`` end to end in its smallest setting: the report, the PNG, and life without matplotlib."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from student_client.demo import DemoConfig, format_report, run_demo
from tests.helpers.teacher_proc import REPO_ROOT

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Smallest run that still kills a teacher mid-training (at steps // 2) and
# draws more than one point per curve.
_SMALL = dict(seeds=1, steps=40, teacher_epochs=5, eval_every_steps=10, progress=False)


def test_demo_writes_a_png_and_loses_no_batch(tmp_path) -> None:
    report = run_demo(DemoConfig.fast(out_dir=str(tmp_path), **_SMALL))

    png = tmp_path / "demo.png"
    assert report["plot"] == str(png)
    data = png.read_bytes()
    assert data.startswith(_PNG_MAGIC) and len(data) > 10_000  # a real image, not an empty canvas
    assert report["batches_lost"] == 0 and report["batches_duplicated"] == 0
    assert report["samples_delivered"] > 0
    assert any(e.startswith("SIGKILLed teacher") for e in report["events"])
    assert json.loads((tmp_path / "report.json").read_text())["batches_lost"] == 0
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
    small = {k: v for k, v in _SMALL.items() if k != "progress"}
    proc = subprocess.run(
        [sys.executable, "-c", _NO_MATPLOTLIB % small, "demo", "--fast", "--out", str(tmp_path), "--no-progress",
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
