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


# --- every `teacher serve` flag ------------------------------------------------
# The contract above covers the variables deploy/ sets; these cover every flag
# of `teacher serve`, so a new flag cannot silently get a broken variable
# (a repeatable flag iterating characters, an on/off flag that "false" turns on).

# (raw env value, expected parsed value) for each value flag, each different
# from the flag's default.
FLAG_SAMPLES: dict[str, tuple[str, object]] = {
    "--model": ("/models/other.pt", "/models/other.pt"),
    "--host": ("0.0.0.0", "0.0.0.0"),
    "--port": ("50099", 50099),
    "--advertise": ("10.1.2.3:50099", "10.1.2.3:50099"),
    "--device": ("cuda:3", "cuda:3"),
    "--precision": ("bf16", "bf16"),
    "--max-batch-size": ("7", 7),
    "--max-batch-tokens": ("8192", 8192),
    "--max-queue-delay-ms": ("3.5", 3.5),
    "--max-queue-size": ("11", 11),
    "--max-message-bytes": ("1048576", 1048576),
    "--grace-s": ("2.5", 2.5),
    "--torch-threads": ("3", 3),
    "--metrics-port": ("9100", 9100),
    "--checkpoint": ("/models/w.pt", "/models/w.pt"),
    "--model-kwargs": ('{"num_classes": 10}', '{"num_classes": 10}'),
    "--features": ("layer3,layer4", "layer3,layer4"),
    "--name": ("resnet-x", "resnet-x"),
    "--version": ("v7", "v7"),
    "--registry": ("redis://r.example:6380/2", "redis://r.example:6380/2"),
    "--service": ("svc-x", "svc-x"),
    "--heartbeat-s": ("0.5", 0.5),
    "--ttl-s": ("9", 9.0),
    "--auth-token-file": ("/run/secrets/tokens", "/run/secrets/tokens"),
    "--tls-cert": ("/tls/server.pem", "/tls/server.pem"),
    "--tls-key": ("/tls/server.key", "/tls/server.key"),
    "--tls-ca": ("/tls/clients-ca.pem", "/tls/clients-ca.pem"),
    "--max-tensor-elements": ("1000", 1000),
    "--max-queued-per-peer": ("5", 5),
    "--local-socket": ("off", "off"),
}
# Repeatable flags: items separated by ';'.
LIST_SAMPLES: dict[str, tuple[str, list[str]]] = {
    "--input-spec": ("x:float32:3,8,8; mask:bool:-1", ["x:float32:3,8,8", "mask:bool:-1"]),
}


def _serve_actions() -> dict[str, "object"]:
    import argparse

    from student_client.cli import build_parser

    root = build_parser()
    teacher = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction)).choices["teacher"]
    serve = next(a for a in teacher._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    return {next(o for o in a.option_strings if o.startswith("--")): a
            for a in serve._actions if a.option_strings and a.dest != "help"}


def _clear_edistill_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("EDISTILL_"):
            monkeypatch.delenv(k)


def _parse_error(argv: list[str]) -> str:
    """stderr of a parse that must fail."""
    from student_client.cli import build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    return err.getvalue()


def _is_bool(action) -> bool:
    import argparse

    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                               argparse.BooleanOptionalAction))


@pytest.mark.parametrize("flag", sorted(_serve_actions()))
def test_every_serve_flag_reads_its_variable(flag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from teacher_server.envflags import SERVE_ENV_NAMES, env_var_name

    _clear_edistill_env(monkeypatch)
    action = _serve_actions()[flag]
    var = env_var_name(flag, SERVE_ENV_NAMES)
    base = [] if flag == "--model" else ["--model", "/models/base.pt"]
    if var is None:
        # Never from the environment: whatever the blanket rule's variable says.
        blanket = env_var_name(flag)
        for raw in ("true", "1", "yes", "false"):
            monkeypatch.setenv(blanket, raw)
            got = getattr(_parse(["teacher", "serve", *base]), action.dest)
            assert got == action.default, f"{blanket}={raw} must not change {flag}, got {got!r}"
        return
    if _is_bool(action):
        on = not action.default
        for raw, expected in (("true", on), ("1", on), ("YES", on), ("on", on),
                              ("false", not on), ("0", not on), ("no", not on), ("Off", not on)):
            monkeypatch.setenv(var, raw)
            got = getattr(_parse(["teacher", "serve", *base]), action.dest)
            assert got is expected, f"{var}={raw} should make {flag} {expected}, got {got!r}"
        monkeypatch.setenv(var, "maybe")
        err = _parse_error(["teacher", "serve", *base])
        assert var in err and "maybe" in err
        return
    if isinstance(action, argparse._AppendAction):
        raw, expected = LIST_SAMPLES[flag]
        monkeypatch.setenv(var, raw)
        assert getattr(_parse(["teacher", "serve", *base]), action.dest) == expected
        # The command line replaces the environment's list (no mixing, no crash).
        got = getattr(_parse(["teacher", "serve", *base, flag, "a:float32:1", flag, "b:int64:2"]), action.dest)
        assert got == ["a:float32:1", "b:int64:2"]
        return
    assert flag in FLAG_SAMPLES, f"add a sample value for {flag} to FLAG_SAMPLES"
    raw, expected = FLAG_SAMPLES[flag]
    monkeypatch.setenv(var, raw)
    got = getattr(_parse(["teacher", "serve", *base]), action.dest)
    assert got == expected, f"{var}={raw!r} should make args.{action.dest} == {expected!r}, got {got!r}"


@pytest.mark.parametrize("var", ["EDISTILL_TLS_CA", "EDISTILL_TLS_CERT", "EDISTILL_TLS_KEY",
                                 "EDISTILL_AUTH_TOKEN_FILE"])
def test_student_credential_variables_do_not_configure_a_teacher(var: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # These are the student's client credentials (student_client/credentials.py).
    _clear_edistill_env(monkeypatch)
    monkeypatch.setenv("EDISTILL_MODEL", "/models/base.pt")
    monkeypatch.setenv(var, "/student/secret.pem")
    args = _parse(["teacher", "serve"])
    assert (args.tls_ca, args.tls_cert, args.tls_key, args.auth_token_file) == (None, None, None, None)


def test_trust_model_file_false_in_environment_stays_off(monkeypatch: pytest.MonkeyPatch) -> None:
    # The reviewer's case: EDISTILL_TRUST_MODEL_FILE=false used to enable unpickling.
    _clear_edistill_env(monkeypatch)
    monkeypatch.setenv("EDISTILL_MODEL", "/models/base.pt")
    monkeypatch.setenv("EDISTILL_TRUST_MODEL_FILE", "false")
    assert _parse(["teacher", "serve"]).trust_model_file is False
    assert _parse(["teacher", "serve", "--trust-model-file"]).trust_model_file is True


@pytest.mark.parametrize("var,raw", [("EDISTILL_PORT", "fifty"), ("EDISTILL_PRECISION", "fp64"),
                                     ("EDISTILL_METRICS_PORT", "x")])
def test_bad_value_names_the_variable(var: str, raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_edistill_env(monkeypatch)
    monkeypatch.setenv("EDISTILL_MODEL", "/models/base.pt")
    monkeypatch.setenv(var, raw)
    err = _parse_error(["teacher", "serve"])
    assert f"{var}={raw!r}" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("kind", ["store_true", "store_false"])
def test_boolean_flags_parse_strictly(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # `teacher serve` has no on/off flag the environment may set today; the
    # rule is checked on a parser of its own so the next one is covered.
    import argparse

    from teacher_server.envflags import apply_env_defaults

    def parse(raw: str | None, argv: list[str] = ()):
        if raw is None:
            monkeypatch.delenv("EDISTILL_FLAG", raising=False)
        else:
            monkeypatch.setenv("EDISTILL_FLAG", raw)
        p = argparse.ArgumentParser(prog="t")
        p.add_argument("--flag", action=kind)
        apply_env_defaults(p)
        return p.parse_args(list(argv)).flag

    # The variable says whether the flag is given, like the flag itself.
    on = kind == "store_true"
    assert parse(None) is not on
    assert parse("false") is not on and parse("0") is not on
    assert parse("true") is on and parse("On") is on
    assert parse("false", ["--flag"]) is on
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        parse("enabled")
    assert "EDISTILL_FLAG='enabled'" in err.getvalue()


# --- one mechanism for the whole command tree (teacher_server/envflags.py) -----


def test_registry_commands_read_the_registry_url_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_edistill_env(monkeypatch)
    monkeypatch.setenv("EDISTILL_REGISTRY", "redis://r.example:6380/2")
    monkeypatch.setenv("EDISTILL_SERVICE", "teacher")  # the teacher's own service in deploy/.env.example
    monkeypatch.setenv("EDISTILL_INTERVAL_S", "9")
    for command in ("ls", "watch"):
        args = _parse(["registry", command])
        assert (args.registry, args.service) == ("redis://r.example:6380/2", None)
    assert _parse(["registry", "watch"]).interval_s == 1.0
    assert _parse(["registry", "ls", "--registry", "redis://cli:6379/0"]).registry == "redis://cli:6379/0"


def test_client_commands_and_the_demo_read_no_flag_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # `teacher health` is the containers' health check: EDISTILL_SERVICE (a
    # registry service name) must not become the gRPC health service it asks about.
    _clear_edistill_env(monkeypatch)
    for var, raw in (("EDISTILL_SERVICE", "teacher"), ("EDISTILL_TIMEOUT_S", "1"), ("EDISTILL_TLS_CA", "/x.pem"),
                     ("EDISTILL_REGISTRY", "redis://r.example:6380/2"), ("EDISTILL_TEACHERS", "5")):
        monkeypatch.setenv(var, raw)
    health = _parse(["teacher", "health", "127.0.0.1:50051"])
    assert (health.health_service, health.timeout_s, health.tls_ca) == ("", 5.0, None)
    assert _parse(["teacher", "describe", "127.0.0.1:50051"]).timeout_s == 5.0
    demo = _parse(["demo"])
    assert (demo.registry, demo.teachers) == (None, 2)


def test_python_m_teacher_server_reads_the_same_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from teacher_server import cli

    _clear_edistill_env(monkeypatch)
    monkeypatch.setenv("EDISTILL_MODEL", "/models/base.pt")
    monkeypatch.setenv("EDISTILL_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("EDISTILL_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("EDISTILL_TLS_CA", "/student/ca.pem")
    args = cli.build_parser().parse_args(["serve"])
    assert (args.log_level, args.model, args.max_batch_size, args.tls_ca) == ("DEBUG", "/models/base.pt", 7, None)
