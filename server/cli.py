"""`microtune` command line: one flag per Settings field; flags override MICROTUNE_* variables.

microtune serve [--model-repository DIR] [--grpc-host H] [--grpc-port P] ...
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from typing import Any

from pydantic import ValidationError

from server import __version__
from server.settings import Settings

__all__ = ["EXIT_CONFIG", "build_parser", "main", "serve_front", "settings_from_args"]

EXIT_CONFIG = 78  # sysexits' EX_CONFIG: the configuration does not fit the machine; not retried


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="microtune",
        description="KServe v2 / Triton-compatible gRPC model server for ONNX models.",
    )
    parser.add_argument("--version", action="version", version=f"microtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve a model repository over gRPC",
        description="Serve a model repository. Every flag can also be set "
        "as MICROTUNE_<NAME> in the environment (an empty one counts as unset); flags win.",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        serve.add_argument(
            flag,
            dest=name,
            default=None,
            metavar=name.upper(),
            help=(field.description or "") + f" (default: {field.default})",
        )
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(**_given(args))


def _given(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}


def settings_error(exc: ValidationError, given: dict[str, Any]) -> str:
    """One line: each problem after the flag or MICROTUNE_* variable that set the value, as the
    user wrote it (pydantic's text runs over lines, names the field, links to its docs)."""
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        if field in given:
            where = f"--{field.replace('_', '-')} {given[field]!r}"
        elif (var := _variable(field)) is not None:
            where = f"{var}={os.environ[var]!r}"
        else:
            where = field or "settings"
        problems.append(f"{where}: {message}")
    return "; ".join(problems)


def _variable(field: str) -> str | None:
    """The environment variable that set `field` (their names are case-insensitive)."""
    wanted = f"MICROTUNE_{field}".upper()
    return next((k for k in os.environ if k.upper() == wanted), None) if field else None


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run the server's event loop: uvloop where it is installed (a C event loop: cheaper
    callbacks and transports for every RPC), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"microtune: invalid settings: {settings_error(exc, _given(args))}", file=sys.stderr)
        return 2
    from server.telemetry.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    if not settings.model_repository.is_dir():  # before the supervisor starts anything
        logging.getLogger("microtune").error(
            "cannot start: model repository %s is not a directory", settings.model_repository
        )
        return EXIT_CONFIG
    if problem := _startup_models_problem(settings):
        # As Triton, which does not start without every model it was told to load: a typo
        # here would otherwise leave a server that looks ready and never serves the model.
        where = "--load-model" if "load_model" in _given(args) else _variable("load_model")
        logging.getLogger("microtune").error("cannot start: %s %s", where, problem)
        return EXIT_CONFIG
    from server.supervisor import frontends_for, run_supervisor

    if frontends_for(settings) > 1:
        return run_supervisor(settings)
    return serve_front(settings)


def _startup_models_problem(settings: Settings) -> str:
    """What is wrong with the models --load-model names, or ""."""
    from server.repository import listed_models, model_names

    names = listed_models(settings.load_model)
    if names and settings.model_control_mode != "explicit":
        # As Triton: the other modes load every model, so a forgotten --model-control-mode
        # would silently load the models the list left out (and ignore a name that is not
        # in the repository).
        return "requires --model-control-mode explicit as well"
    if not names or names == ["*"]:
        return ""
    if "*" in names:
        return "'*' loads every model: it cannot stand beside other names"
    present = set(model_names(settings.model_repository))
    if missing := [n for n in names if n not in present]:
        return f"{', '.join(missing)}: no such model in {settings.model_repository}"
    return ""


def serve_front(settings: Settings) -> int:
    """Run one front process until it is stopped; its exit code. A setting the machine cannot
    honour (a /dev/shm too small for the arena, a metrics port in use) ends it with
    EXIT_CONFIG and one log line."""
    from runtime.ipc.shm import ArenaNoSpace
    from server.app import serve
    from server.errors import CannotStart

    try:
        return run_loop(serve(settings))
    except KeyboardInterrupt:
        return 0
    except (ArenaNoSpace, CannotStart) as exc:
        logging.getLogger("microtune").error("cannot start: %s", exc)
        return EXIT_CONFIG
