"""deploy/Dockerfile and .dockerignore, checked as far as possible without a
Docker engine (none is available to the test suite).

A small Dockerfile parser (instructions, line continuations, comments, exec
and shell forms) and a .dockerignore matcher with Docker's semantics let us
check what a real build would trip over: COPY sources that are missing or
excluded from the context, build args without defaults or used out of scope,
the image running as root, and a HEALTHCHECK / ENTRYPOINT naming `edistill`
commands that do not exist or do not behave. The commands themselves are run
here, from the project's virtual environment, against a real gRPC health
server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
# deploy/docker-compose.yml builds with `context: ..`: the repository root.
CONTEXT = ROOT
EDISTILL = Path(sys.executable).parent / "edistill"


# --------------------------------------------------------------------------
# Dockerfile parser
# --------------------------------------------------------------------------
class DockerfileError(ValueError):
    """The Dockerfile text cannot be parsed."""


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper-case, e.g. "COPY"
    value: str  # everything after the keyword, continuations joined
    line: int  # 1-based line where the instruction starts

    def flags_and_rest(self) -> tuple[dict[str, str], str]:
        """Split leading `--flag=value` options (COPY --chown, HEALTHCHECK
        --interval, ...) from the rest of the instruction."""
        flags: dict[str, str] = {}
        rest = self.value
        while True:
            m = re.match(r"--([a-z-]+)(?:=(\S*))?\s+", rest)
            if not m:
                return flags, rest
            flags[m.group(1)] = m.group(2) or ""
            rest = rest[m.end():]

    @staticmethod
    def exec_form(text: str) -> list[str] | None:
        """The JSON array of the exec form, or None for the shell form."""
        text = text.strip()
        if not text.startswith("["):
            return None
        try:
            words = json.loads(text)
        except json.JSONDecodeError:
            # Docker silently treats invalid JSON as the shell form; a
            # bracketed command that is not JSON is almost surely a typo.
            raise DockerfileError(f"not valid JSON exec form: {text!r}") from None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise DockerfileError(f"exec form must be a list of strings: {text!r}")
        return words


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile, as BuildKit's parser sees them.

    Comment lines start with `#` (parser directives are comments too);
    a line ending in `\\` continues on the next one, and comment or blank
    lines inside a continuation are dropped, as Docker does. Heredocs
    (`<<EOF`) are rejected rather than mis-parsed: this Dockerfile does not
    need them.
    """
    instructions: list[Instruction] = []
    buf: str | None = None
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if buf is None:
            buf, start = "", n
        line = raw.rstrip()
        if line.endswith("\\"):
            buf += line[:-1]
            continue
        buf += line
        keyword, _, value = buf.strip().partition(" ")
        if re.search(r"<<-?['\"]?[A-Za-z_]+", value) and keyword.upper() in {"RUN", "COPY"}:
            raise DockerfileError(f"line {start}: heredocs are not supported by this parser")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
        buf = None
    if buf is not None:
        raise DockerfileError(f"line {start}: continuation runs past the end of the file")
    return instructions


def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def _var_refs(text: str) -> set[str]:
    """Names referenced as $NAME or ${NAME...} (any ${NAME:-default} form)."""
    return set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))


def _arg_decl(value: str) -> tuple[str, str | None]:
    name, eq, default = value.partition("=")
    return name.strip(), (default.strip().strip("\"'") if eq else None)


def _env_decls(value: str) -> dict[str, str]:
    """ENV a=1 b=2 (and the legacy `ENV a 1` form)."""
    words = shlex.split(value)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words)


def final_stage() -> list[Instruction]:
    instrs = dockerfile()
    froms = [i for i, ins in enumerate(instrs) if ins.keyword == "FROM"]
    assert froms, "deploy/Dockerfile has no FROM"
    return instrs[froms[-1]:]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in final_stage():
        if ins.keyword == "ENV":
            env.update(_env_decls(ins.value))
    return env


def image_user_uid() -> int:
    """The numeric UID the image runs as (the last USER of the final stage)."""
    users = [ins for ins in final_stage() if ins.keyword == "USER"]
    assert users, "deploy/Dockerfile never sets USER: the teacher would run as root"
    user = users[-1].value.split(":")[0]
    assert user.isdigit(), (
        f"USER {users[-1].value!r} (line {users[-1].line}) should be numeric, so "
        "Kubernetes' runAsNonRoot can verify it without a passwd lookup")
    return int(user)


# --------------------------------------------------------------------------
# .dockerignore matcher
# --------------------------------------------------------------------------
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Go filepath.Match plus `**`, as moby/patternmatcher translates them."""
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):  # "**/" : zero or more directories
                i += 1
                out += "(?:.*/)?"
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1:end].replace("!", "^", 1) + "]"
            i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def load_dockerignore(path: Path = DOCKERIGNORE) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = os.path.normpath(line[1:].strip() if negate else line).lstrip("/")
        rules.append((negate, _pattern_regex(pat)))
    return rules


def is_excluded(relpath: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern that matches the path *or one of its
    parent directories* decides; `!` patterns re-include."""
    parts = relpath.strip("/").split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for negate, rx in rules:
        if any(rx.match(p) for p in prefixes):
            excluded = not negate
    return excluded


# --------------------------------------------------------------------------
# The parser and matcher themselves (so a bug in them cannot hide one in the
# Dockerfile)
# --------------------------------------------------------------------------
def test_parser_joins_continuations_and_drops_comments() -> None:
    text = (
        "# syntax=docker/dockerfile:1\n"
        "ARG A=1\n"
        "FROM x:${A}\n"
        "RUN echo a \\\n"
        "    # a comment inside a continuation is dropped\n"
        "\n"
        "    && echo b\n"
        'ENTRYPOINT ["edistill", "teacher"]\n'
        "HEALTHCHECK --interval=5s --timeout=2s CMD foo || exit 1\n"
    )
    ins = parse_dockerfile(text)
    assert [i.keyword for i in ins] == ["ARG", "FROM", "RUN", "ENTRYPOINT", "HEALTHCHECK"]
    assert ins[2].value == "echo a     && echo b" and ins[2].line == 4
    assert Instruction.exec_form(ins[3].value) == ["edistill", "teacher"]
    flags, rest = ins[4].flags_and_rest()
    assert flags == {"interval": "5s", "timeout": "2s"} and rest == "CMD foo || exit 1"
    with pytest.raises(DockerfileError, match="past the end"):
        parse_dockerfile("FROM x\nRUN a \\\n")
    with pytest.raises(DockerfileError, match="JSON"):
        Instruction.exec_form('["edistill", teacher]')


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        (".venv/bin/python", True),
        (".git/HEAD", True),
        ("tests/test_x.py", True),
        ("deploy/models/teacher.pt", True),
        ("protos/__pycache__/codec.cpython-311.pyc", True),
        ("edistill.egg-info/PKG-INFO", True),
        ("pyproject.toml", False),
        ("protos/codec.py", False),
        ("protos/edistill/v1/teacher.proto", False),
        ("teacher_server/cli.py", False),
    ],
)
def test_dockerignore_keeps_out_what_it_should(path: str, excluded: bool) -> None:
    assert is_excluded(path, load_dockerignore()) is excluded, (
        f"{path} should {'not ' if not excluded else ''}be excluded by .dockerignore")


# --------------------------------------------------------------------------
# The Dockerfile
# --------------------------------------------------------------------------
def _copy_sources() -> list[tuple[Instruction, str]]:
    out = []
    for ins in final_stage():
        if ins.keyword not in {"COPY", "ADD"}:
            continue
        flags, rest = ins.flags_and_rest()
        if "from" in flags:  # copies from another stage or image, not the context
            continue
        words = Instruction.exec_form(rest) or shlex.split(rest)
        assert len(words) >= 2, f"line {ins.line}: {ins.keyword} needs a source and a dest"
        out.extend((ins, src) for src in words[:-1])
    return out


def test_every_copy_source_is_in_the_build_context() -> None:
    rules = load_dockerignore()
    sources = _copy_sources()
    assert sources, "deploy/Dockerfile copies nothing from the repository"
    problems = []
    for ins, src in sources:
        where = f"line {ins.line}: {ins.keyword} {src}"
        if any(ch in src for ch in "*?[") or "://" in src:
            problems.append(f"{where}: use plain paths so the context can be checked")
            continue
        rel = os.path.normpath(src)
        path = CONTEXT / rel
        if rel.startswith(".."):
            problems.append(f"{where}: outside the build context")
        elif not path.exists():
            problems.append(f"{where}: {path.relative_to(ROOT)} does not exist in the repository")
        elif is_excluded(rel, rules):
            problems.append(f"{where}: excluded by .dockerignore")
        elif path.is_dir():
            # A directory must bring its files along, not an empty shell.
            files = [p for p in path.rglob("*") if p.is_file()
                     and "__pycache__" not in p.parts and p.suffix != ".pyc"]
            dropped = [str(p.relative_to(CONTEXT)) for p in files
                       if is_excluded(str(p.relative_to(CONTEXT)), rules)]
            if not files:
                problems.append(f"{where}: directory is empty")
            if dropped:
                problems.append(f"{where}: .dockerignore drops {dropped[:5]}")
    assert not problems, "COPY sources a real build would miss:\n  " + "\n  ".join(problems)


def test_pip_install_gets_everything_pyproject_needs() -> None:
    """`pip install .` needs pyproject.toml, its readme file and every
    package [tool.setuptools.packages.find] includes, all COPY'd before it."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml"}
    readme = meta["project"].get("readme")
    if isinstance(readme, str):
        needed.add(readme)
    for pattern in meta["tool"]["setuptools"]["packages"]["find"]["include"]:
        needed.add(pattern.rstrip("*").rstrip("."))
    stage = final_stage()
    install = [i for i, ins in enumerate(stage)
               if ins.keyword == "RUN" and re.search(r"pip install (/src|\.)(\s|$)", ins.value)]
    assert install, "deploy/Dockerfile never runs `pip install` of the project"
    copied_before = {os.path.normpath(src) for ins, src in _copy_sources()
                     if ins.line < stage[install[0]].line}
    missing = sorted(needed - copied_before)
    assert not missing, f"not copied before `pip install` (line {stage[install[0]].line}): {missing}"


def test_torch_comes_from_the_index_build_arg_before_the_project() -> None:
    stage = final_stage()
    torch_i = [i for i, ins in enumerate(stage) if ins.keyword == "RUN" and "torch==" in ins.value]
    project_i = [i for i, ins in enumerate(stage) if ins.keyword == "RUN" and "pip install /src" in ins.value]
    assert torch_i and project_i, "expected one RUN installing torch==X and one installing /src"
    assert torch_i[0] < project_i[0], (
        "torch must be installed first: otherwise the project's `torch` requirement "
        "pulls the multi-GB CUDA build from PyPI even for the CPU image")
    assert "${TORCH_INDEX_URL}" in stage[torch_i[0]].value


def test_build_args_have_defaults_and_are_in_scope() -> None:
    instrs = dockerfile()
    first_from = next(i for i, ins in enumerate(instrs) if ins.keyword == "FROM")
    global_args = dict(_arg_decl(ins.value) for ins in instrs[:first_from] if ins.keyword == "ARG")
    assert "BASE_IMAGE" in global_args, "the base image must be selectable by a BASE_IMAGE build arg"
    problems = [f"ARG {k} has no default" for k, v in global_args.items() if not v]

    for ins in instrs:
        if ins.keyword == "FROM":
            for name in _var_refs(ins.value):
                if not global_args.get(name):
                    problems.append(f"line {ins.line}: FROM uses ${name}, not a global ARG with a default")

    # Inside a stage, a global ARG is invisible unless re-declared, and an
    # undeclared ${X} in RUN silently expands to "" at build time.
    known = {"PATH", "HOME"}  # come from the base image's environment
    for ins in final_stage()[1:]:
        if ins.keyword == "ARG":
            name, default = _arg_decl(ins.value)
            if default is None:
                problems.append(f"line {ins.line}: ARG {name} has no default")
            known.add(name)
        elif ins.keyword == "ENV":
            known.update(_env_decls(ins.value))
        elif ins.keyword == "RUN":
            for name in _var_refs(ins.value) - known:
                problems.append(f"line {ins.line}: RUN uses ${name}, declared by no ARG/ENV before it")
    assert not problems, "deploy/Dockerfile:\n  " + "\n  ".join(problems)


def test_runs_as_a_non_root_user_that_exists() -> None:
    stage = final_stage()
    uid = image_user_uid()
    assert uid != 0, "USER must not be root"
    users = [i for i, ins in enumerate(stage) if ins.keyword == "USER"]
    entry = [i for i, ins in enumerate(stage) if ins.keyword == "ENTRYPOINT"]
    assert entry and users[-1] < entry[-1], "USER must be set before ENTRYPOINT"
    # The UID needs a passwd entry (a HOME, a name in logs): made by useradd.
    assert any(ins.keyword == "RUN" and re.search(rf"useradd\b.*--uid {uid}\b", ins.value)
               for ins in stage), f"no `useradd --uid {uid}` creates the image's user"


def test_port_is_consistent_across_env_expose_and_healthcheck() -> None:
    env = image_env()
    port = env.get("EDISTILL_PORT")
    assert port and port.isdigit(), "ENV EDISTILL_PORT must set the serving port"
    exposed = {ins.value.split("/")[0] for ins in final_stage() if ins.keyword == "EXPOSE"}
    assert exposed == {port}, f"EXPOSE {exposed} != EDISTILL_PORT {port}"
    assert env.get("EDISTILL_HOST") == "0.0.0.0", (
        "a container must listen on 0.0.0.0; loopback is unreachable from other containers")
    assert "EDISTILL_ADVERTISE" not in env, (
        "one baked-in advertise address would be wrong for every scaled replica")


def _healthcheck_command() -> str:
    hcs = [ins for ins in final_stage() if ins.keyword == "HEALTHCHECK"]
    assert len(hcs) == 1, "deploy/Dockerfile needs exactly one HEALTHCHECK"
    flags, rest = hcs[0].flags_and_rest()
    assert "start-period" in flags, "loading a model takes time: set --start-period"
    kind, _, cmd = rest.partition(" ")
    assert kind == "CMD", f"HEALTHCHECK must run a command, got {rest!r}"
    assert Instruction.exec_form(cmd) is None, "shell form, so ${EDISTILL_PORT} is expanded"
    return cmd


def test_healthcheck_names_edistill_teacher_health_and_maps_exit_codes() -> None:
    cmd = _healthcheck_command()
    words = shlex.split(cmd)
    assert words[:3] == ["edistill", "teacher", "health"], f"HEALTHCHECK runs {cmd!r}"
    # ARGs are gone at run time; only ENV reaches the container's shell.
    assert _var_refs(cmd) <= set(image_env()), f"{cmd!r} uses a variable no ENV sets"
    # Docker: 0 healthy, 1 unhealthy, 2 reserved. The edistill CLI exits 2
    # on errors, which must read as unhealthy.
    assert cmd.rstrip().endswith("|| exit 1"), "end the health command with `|| exit 1`"


def _edistill_help(*subcommand: str) -> subprocess.CompletedProcess[str]:
    assert EDISTILL.exists(), f"{EDISTILL} missing: install the project into the venv (scripts/setup.sh)"
    return subprocess.run([str(EDISTILL), *subcommand, "--help"], capture_output=True,
                          text=True, timeout=60)


def test_entrypoint_command_exists_here() -> None:
    entry = [ins for ins in final_stage() if ins.keyword == "ENTRYPOINT"]
    assert entry, "deploy/Dockerfile has no ENTRYPOINT"
    words = Instruction.exec_form(entry[-1].value)
    # Exec form: SIGTERM reaches the teacher itself (a shell form puts
    # /bin/sh in between, which does not forward it, and the drain never runs).
    assert words == ["edistill", "teacher", "serve"], f"ENTRYPOINT {entry[-1].value}"
    for sub in (words[1:], ["teacher", "health"]):
        proc = _edistill_help(*sub)
        # Fails until teacher_server/cli.py provides these sub-commands.
        assert proc.returncode == 0, (
            f"`edistill {' '.join(sub)} --help`, named by the Dockerfile, does not run "
            f"(exit {proc.returncode}); is teacher_server/cli.py there yet?\n{proc.stderr[-2000:]}")


@pytest.fixture
def health_server():
    """A real gRPC server with the standard health service, on an ephemeral
    port: what `edistill teacher health` talks to inside the container."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    def set_status(serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", "edistill.v1.Teacher"):  # overall and per-service
            servicer.set(name, status)

    try:
        yield port, set_status
    finally:
        server.stop(grace=None)


def _run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    """Run the HEALTHCHECK line exactly as Docker does: `/bin/sh -c CMD`,
    with the image's environment."""
    env = {**os.environ, **image_env(), "EDISTILL_PORT": str(port),
           "PATH": f"{EDISTILL.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["/bin/sh", "-c", _healthcheck_command()], env=env,
                          capture_output=True, text=True, timeout=60)


def test_healthcheck_command_reports_serving_and_not_serving(health_server) -> None:
    port, set_status = health_server
    set_status(True)
    ok = _run_healthcheck(port)
    assert ok.returncode == 0, (
        f"HEALTHCHECK exited {ok.returncode} against a SERVING server; "
        f"does `edistill teacher health` exist yet?\n{ok.stderr[-2000:]}")
    set_status(False)
    bad = _run_healthcheck(port)
    assert bad.returncode == 1, f"NOT_SERVING must read as unhealthy (1), got {bad.returncode}"
    assert "Traceback" not in bad.stderr, f"expected one clear line, got:\n{bad.stderr[-2000:]}"
