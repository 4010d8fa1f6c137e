"""The README's runnable shell blocks run, so the README cannot rot.

A fenced ``bash`` block preceded by ``<!-- runnable -->`` is run as written; one
preceded by ``<!-- runnable: COMMAND -->`` is run as COMMAND instead (a fast
variant of a long command, e.g. the demo). Blocks run with ``bash -euo
pipefail`` in a fresh temporary directory, with this interpreter's ``bin``
first on PATH (where ``edistill`` and ``python`` live) and the repository as
the working tree for relative paths such as ``.venv/bin/edistill``.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

_BLOCK = re.compile(r"<!-- runnable(?::\s*(?P<cmd>.*?))? -->\s*\n```(?:bash|sh)\n(?P<body>.*?)```", re.S)


def runnable_blocks() -> list[tuple[str, str]]:
    """(id, script) for every runnable block, in README order."""
    blocks = []
    for i, m in enumerate(_BLOCK.finditer(README.read_text())):
        script = m.group("cmd") or m.group("body")
        first = script.strip().splitlines()[0][:50]
        blocks.append((f"block{i}:{first}", script))
    return blocks


def test_readme_has_runnable_blocks() -> None:
    # The regex must keep finding the blocks: a README edit that breaks the
    # markers would otherwise silently test nothing.
    assert len(runnable_blocks()) >= 3


@pytest.mark.parametrize("script", [s for _, s in runnable_blocks()], ids=[i for i, _ in runnable_blocks()])
def test_readme_block_runs(script: str, tmp_path: pathlib.Path) -> None:
    bin_dir = pathlib.Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    # Relative paths in README commands are relative to the repository root;
    # everything a block writes goes to the temporary directory.
    script = script.replace(".venv/bin/", f"{bin_dir}/")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    logs = "".join(f"\n--- {p.name}:\n{p.read_text(errors='replace')[-2000:]}" for p in tmp_path.glob("*.log"))
    assert proc.returncode == 0, (f"README block failed (exit {proc.returncode}):\n{script}\n"
                                  f"--- stdout:\n{proc.stdout[-3000:]}\n--- stderr:\n{proc.stderr[-3000:]}{logs}")
