"""The environment-variable contract between deploy/ and the CLI.

Containers are configured through EDISTILL_* variables (deploy/.env.example,
the Dockerfile's ENV, the compose `environment:`, the Kubernetes ConfigMap
and pod env). The rule: `EDISTILL_<FLAG>` with the flag's dashes as
underscores, upper-case (`--max-batch-size` <-> EDISTILL_MAX_BATCH_SIZE),
is the default of that flag of `edistill teacher serve` (or of the umbrella
`--log-level`); a flag given on the command line wins, and an empty value
counts as unset (compose passes `X=` through as an empty string).

These tests fail until the CLI reads the environment when its parser is
built; that is the point: a deploy file naming a variable the CLI ignores
would start teachers with silently wrong settings.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest
import yaml

from tests.test_deploy_dockerfile import image_env

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"

# A value for every variable, each different from the CLI's default, in the
# type the parsed flag should end up with.
SAMPLES: dict[str, tuple[str, object]] = {
    "EDISTILL_MODEL": ("/models/other.pt", "/models/other.pt"),
    "EDISTILL_HOST": ("0.0.0.0", "0.0.0.0"),
    "EDISTILL_PORT": ("50099", 50099),
    "EDISTILL_ADVERTISE": ("10.1.2.3:50099", "10.1.2.3:50099"),
    "EDISTILL_DEVICE": ("cuda:3", "cuda:3"),
    "EDISTILL_PRECISION": ("bf16", "bf16"),
    "EDISTILL_MAX_BATCH_SIZE": ("7", 7),
    "EDISTILL_MAX_QUEUE_DELAY_MS": ("3.5", 3.5),
    "EDISTILL_REGISTRY": ("redis://r.example:6380/2", "redis://r.example:6380/2"),
    "EDISTILL_SERVICE": ("svc-x", "svc-x"),
    "EDISTILL_LOG_LEVEL": ("DEBUG", "DEBUG"),
}


def deploy_env_vars() -> dict[str, str]:
    """Every EDISTILL_* variable a deploy file sets, and where."""
    found: dict[str, str] = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        m = re.match(r"^(EDISTILL_[A-Z0-9_]+)=", line)
        if m:
            found.setdefault(m.group(1), "deploy/.env.example")
    for name in image_env():
        if name.startswith("EDISTILL_"):
            found.setdefault(name, "deploy/Dockerfile")
    for f in ("docker-compose.yml", "docker-compose.gpu.yml"):
        for svc in yaml.safe_load((DEPLOY / f).read_text())["services"].values():
            for name in svc.get("environment") or {}:
                found.setdefault(name, f"deploy/{f}")
    for f in (DEPLOY / "k8s").glob("*.yaml"):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc.get("kind") == "ConfigMap":
                for name in doc["data"]:
                    found.setdefault(name, f"deploy/k8s/{f.name}")
            pod = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("containers", []):
                for e in c.get("env", []):
                    if e["name"].startswith("EDISTILL_"):
                        found.setdefault(e["name"], f"deploy/k8s/{f.name}")
    return found


def _dest(var: str) -> str:
    return var.removeprefix("EDISTILL_").lower()


def _parse(argv: list[str]):
    # Built inside the test, after monkeypatch.setenv: the environment is read
    # when the parser is built.
    from student_client.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit as exc:
        env = {k: v for k, v in os.environ.items() if k.startswith("EDISTILL_")}
        pytest.fail(f"`edistill {' '.join(argv)}` with {env} was rejected (exit {exc.code}): "
                    f"{err.getvalue().strip().splitlines()[-1:]}; does the CLI read EDISTILL_* "
                    "variables as flag defaults yet?")


def _option_strings() -> set[str]:
    """Flags of `edistill teacher serve` and of the umbrella parser."""
    import argparse

    from student_client.cli import build_parser

    opts: set[str] = set()
    parser = build_parser()
    stack = [(parser, [])]
    while stack:  # walk down to `teacher serve` through the sub-parsers
        p, path = stack.pop()
        for action in p._actions:  # argparse has no public API for this
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if path + [name] in (["teacher"], ["teacher", "serve"]):
                        stack.append((sub, path + [name]))
            elif path in ([], ["teacher", "serve"]):
                opts.update(action.option_strings)
    return opts


def test_every_deploy_variable_has_a_sample() -> None:
    missing = set(deploy_env_vars()) - set(SAMPLES)
    assert not missing, f"add a sample value for {sorted(missing)} to SAMPLES"


def test_every_deploy_variable_names_a_cli_flag() -> None:
    opts = _option_strings()
    problems = [f"{var} (set in {where}) -> no flag --{_dest(var).replace('_', '-')}"
                for var, where in sorted(deploy_env_vars().items())
                if f"--{_dest(var).replace('_', '-')}" not in opts]
    assert not problems, "the CLI lacks flags the deploy files configure:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("var", sorted(SAMPLES))
def test_variable_sets_the_flag_default(var: str, monkeypatch: pytest.MonkeyPatch) -> None:
    raw, expected = SAMPLES[var]
    # --model is required; the environment must be able to satisfy it.
    monkeypatch.setenv("EDISTILL_MODEL", "/models/base.pt")
    monkeypatch.setenv(var, raw)
    args = _parse(["teacher", "serve"])
    got = getattr(args, _dest(var), "<no such attribute>")
    assert got == expected, f"{var}={raw!r} should make args.{_dest(var)} == {expected!r}, got {got!r}"


def test_command_line_flag_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDISTILL_MODEL", "/models/base.pt")
    monkeypatch.setenv("EDISTILL_MAX_BATCH_SIZE", "7")
    args = _parse(["teacher", "serve", "--max-batch-size", "9", "--model", "/models/cli.pt"])
    assert (args.max_batch_size, args.model) == (9, "/models/cli.pt")


def test_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDISTILL_MODEL", "/models/base.pt")
    monkeypatch.delenv("EDISTILL_ADVERTISE", raising=False)
    monkeypatch.delenv("EDISTILL_MAX_BATCH_SIZE", raising=False)
    unset = _parse(["teacher", "serve"])
    monkeypatch.setenv("EDISTILL_ADVERTISE", "")
    monkeypatch.setenv("EDISTILL_MAX_BATCH_SIZE", "")
    empty = _parse(["teacher", "serve"])
    assert (empty.advertise, empty.max_batch_size) == (unset.advertise, unset.max_batch_size)
