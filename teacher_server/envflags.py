"""THE place where edistill's command lines read the environment: ``EDISTILL_<FLAG>`` flag defaults.

Containers are configured through the environment (deploy/.env.example, the
Dockerfile, compose, Kubernetes), and secrets such as a Redis URL with a
password are kept off command lines (and out of ``ps``) the same way. One
rule for every command, applied in one place: the umbrella parser
(:func:`student_client.cli.build_parser`) and ``python -m teacher_server``
call :func:`apply_env_tree` once, when the whole command tree is built, and
it sets the defaults of the commands listed in :data:`ENV_COMMANDS`:

- a flag ``--max-batch-size`` defaults to ``$EDISTILL_MAX_BATCH_SIZE``
  (:func:`env_var_name`); a flag on the command line still wins, and an
  empty variable counts as unset;
- per command, an :class:`EnvRule` names the exceptions: another variable for
  a flag, a flag never read from the environment (:data:`SERVE_ENV_NAMES`),
  or the only flags that are read (the registry commands read ``--registry``
  alone);
- commands not listed (``teacher describe``/``health``, ``demo``) read no
  flag from the environment.

How values are converted, and what a bad one does, is in
:func:`apply_env_defaults`. Library code that reads its own variables
(student credentials, ``EDISTILL_LOCAL_TRANSPORT``, ``EDISTILL_RUNTIME_DIR``,
``EDISTILL_REDIS_SERVER``) documents them where it reads them; this module is
about command-line flags only.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Mapping

__all__ = ["ENV_COMMANDS", "ENV_LIST_SEP", "ENV_PREFIX", "REGISTRY_ENV", "SERVE_ENV_NAMES", "EnvRule",
           "apply_env_defaults", "apply_env_tree", "env_var_name"]

#: What every flag's variable starts with.
ENV_PREFIX = "EDISTILL_"


@dataclasses.dataclass(frozen=True)
class EnvRule:
    """How one command's flags read the environment."""

    # flag -> its variable when not EDISTILL_<FLAG>; None: never from the environment
    names: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    # when set, the only flags read from the environment (None: every flag)
    only: frozenset[str] | None = None


#: ``teacher serve`` flags whose variable is NOT ``EDISTILL_<FLAG>``. ``None``:
#: never read from the environment. The rule: a flag that relaxes a safety
#: check is opt-in on the command line only, and the teacher's own
#: credentials (server certificate, client CA, accepted-token file) have
#: ``EDISTILL_TEACHER_*`` names, because ``EDISTILL_TLS_*`` and
#: ``EDISTILL_AUTH_TOKEN_FILE`` are the *student's* client credentials
#: (student_client/credentials.py): a student's CA exported in a shell must
#: not make a teacher started from that shell demand client certificates.
SERVE_ENV_NAMES: dict[str, str | None] = {
    "--trust-model-file": None,
    "--trust-remote-code": None,
    "--tls-cert": "EDISTILL_TEACHER_TLS_CERT",
    "--tls-key": "EDISTILL_TEACHER_TLS_KEY",
    "--tls-ca": "EDISTILL_TEACHER_TLS_CA",
    "--auth-token-file": "EDISTILL_TEACHER_AUTH_TOKEN_FILE",
}

#: ``registry ls|watch`` read only ``--registry`` (``$EDISTILL_REGISTRY``,
#: ``registry.REGISTRY_URL_ENV``): in a teacher's container
#: ``EDISTILL_SERVICE`` names that teacher's service, and ``registry ls`` run
#: there must still list every service.
REGISTRY_ENV = EnvRule(only=frozenset({"--registry"}))

#: The commands that read flag defaults from the environment, by command path
#: under ``edistill`` (``()`` is the umbrella itself, for ``--log-level``;
#: ``("teacher",)`` is also the root of ``python -m teacher_server``).
ENV_COMMANDS: dict[tuple[str, ...], EnvRule] = {
    (): EnvRule(),
    ("teacher",): EnvRule(),
    ("teacher", "serve"): EnvRule(names=SERVE_ENV_NAMES),
    ("registry", "ls"): REGISTRY_ENV,
    ("registry", "watch"): REGISTRY_ENV,
}


#: Separator of the items of a repeatable flag given through the environment
#: (``EDISTILL_INPUT_SPEC="x:float32:3,32,32;mask:bool:32"``).
ENV_LIST_SEP = ";"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env_var_name(option: str, names: Mapping[str, str | None] | None = None,
                 prefix: str = ENV_PREFIX) -> str | None:
    """The variable that sets ``option``'s default (``--max-batch-size`` -> ``EDISTILL_MAX_BATCH_SIZE``).

    ``names`` overrides the rule per flag; ``None`` there means the flag is
    never read from the environment.
    """
    if names is not None and option in names:
        return names[option]
    return prefix + option.lstrip("-").replace("-", "_").upper()


def apply_env_tree(root: argparse.ArgumentParser, path: tuple[str, ...] = (),
                   commands: Mapping[tuple[str, ...], EnvRule] | None = None) -> None:
    """Apply :func:`apply_env_defaults` to ``root`` and every sub-command parser below it.

    Args:
        root: a parser whose sub-commands are all added already.
        path: ``root``'s own command path under ``edistill`` (``("teacher",)``
            for ``python -m teacher_server``).
        commands: the rule per command path (default :data:`ENV_COMMANDS`);
            a parser whose path is not there reads nothing.
    """
    commands = ENV_COMMANDS if commands is None else commands
    stack = [(root, path)]
    while stack:
        parser, where = stack.pop()
        rule = commands.get(where)
        if rule is not None:
            apply_env_defaults(parser, names=rule.names, only=rule.only)
        for action in parser._actions:  # argparse has no public accessor
            if isinstance(action, argparse._SubParsersAction):
                stack.extend((sub, (*where, name)) for name, sub in action.choices.items())


def apply_env_defaults(parser: argparse.ArgumentParser, prefix: str = ENV_PREFIX,
                       names: Mapping[str, str | None] | None = None,
                       only: frozenset[str] | set[str] | None = None) -> None:
    """Let ``EDISTILL_<FLAG>`` (dashes as underscores) set each flag's default.

    Containers are configured through the environment (deploy/.env.example);
    a flag on the command line still wins, and an empty value counts as
    unset. ``names`` maps a flag to another variable, or to ``None`` (never
    from the environment; see :data:`SERVE_ENV_NAMES`); with ``only``, no
    other flag is read. This parser only: sub-commands are
    :func:`apply_env_tree`'s business. Values are converted
    when the command is parsed, and a bad one is an argparse error naming the
    variable:

    - value flags: the flag's ``type`` and ``choices`` apply
      (``EDISTILL_PORT=50051`` arrives as an int);
    - on/off flags: ``1/true/yes/on`` (as if the flag were given) or
      ``0/false/no/off`` (as if not), any case, nothing else (``=false``
      must not turn a flag on);
    - repeatable flags: items separated by ``;`` (:data:`ENV_LIST_SEP`); using
      the flag on the command line replaces the whole list (items of a typed
      repeatable flag are converted when the parser is built).

    A required flag whose variable is set is no longer required. Other kinds
    of flags (counters, constants) are not read from the environment.
    """
    for action in parser._actions:  # argparse has no public accessor
        if not action.option_strings or action.dest == "help":
            continue
        long = next((o for o in action.option_strings if o.startswith("--")), None)
        if long is None or (only is not None and long not in only):
            continue
        var = env_var_name(long, names, prefix)
        if var is None:
            continue
        value = os.environ.get(var, "")
        if value == "":
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                               argparse.BooleanOptionalAction)):
            # argparse converts a string default with ``type`` when it parses
            # (and only then), so a bad value fails that command, not others.
            if isinstance(action, argparse.BooleanOptionalAction):
                action.type = _env_bool(var, True, False)
            else:  # the variable says whether the flag is given: --no-x for store_false
                action.type = _env_bool(var, action.const, action.default)
        elif isinstance(action, argparse._AppendAction):
            items = [item.strip() for item in value.split(ENV_LIST_SEP) if item.strip()]
            if not items:
                continue
            if action.type is not None or action.choices is not None:
                # argparse never converts a list default: convert now (a bad
                # item stops this parser's construction, naming the variable).
                convert = _env_typed(action.type, action.choices, var, items)
                try:
                    items = [convert(item) for item in items]
                except argparse.ArgumentTypeError as exc:
                    parser.error(f"argument {long}: {exc}")
            action.__class__ = _EnvAppendAction
            value = _EnvList(items)
        elif type(action) is argparse._StoreAction:
            action.type = _env_typed(action.type, action.choices, var, [value])
        else:
            continue
        action.default = value
        action.required = False


def _env_bool(var: str, on: object, off: object):
    def convert(text: str) -> object:
        low = text.strip().lower()
        if low in _TRUE:
            return on
        if low in _FALSE:
            return off
        raise argparse.ArgumentTypeError(
            f"{var}={text!r} is not a boolean: use one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}")
    convert.__name__ = "boolean"
    return convert


def _env_typed(type_func, choices, var: str, env_values: list[str]):
    """``type_func`` that names ``var`` when a value from the environment is bad."""
    def convert(text: str):
        try:
            result = type_func(text) if type_func is not None else text
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            if text not in env_values:
                raise
            detail = str(exc) if isinstance(exc, argparse.ArgumentTypeError) else \
                f"invalid {getattr(type_func, '__name__', repr(type_func))} value"
            raise argparse.ArgumentTypeError(f"{var}={text!r}: {detail}") from None
        if choices is not None and text in env_values and result not in choices:
            raise argparse.ArgumentTypeError(
                f"{var}={text!r}: invalid choice (choose from {', '.join(map(repr, choices))})")
        return result
    convert.__name__ = getattr(type_func, "__name__", "str")
    return convert


class _EnvList(list):
    """A repeatable flag's items from the environment (marks the default so the command line replaces it)."""


class _EnvAppendAction(argparse._AppendAction):
    """``append`` whose environment default is replaced, not extended, by the command line."""

    def __call__(self, parser, namespace, values, option_string=None):
        if isinstance(getattr(namespace, self.dest, None), _EnvList):
            setattr(namespace, self.dest, None)
        super().__call__(parser, namespace, values, option_string)
