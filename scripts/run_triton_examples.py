#!/usr/bin/env python3
"""Run tritonclient's own gRPC example programs against a running server; print PASS/FAIL.

The example programs live in triton-inference-server/client under ``src/python/examples/``.
They are NOT part of this repository: copy the ``.py`` files you need into an ignored directory
(default ``.cache/triton-examples``) and point ``--examples-dir`` at it. This script only knows
each example's command-line flags and how it reports success; it contains none of their code.

Usage::

    python scripts/run_triton_examples.py                       # the default set, in order
    python scripts/run_triton_examples.py --url 127.0.0.1:8001 simple_grpc_infer_client
    python scripts/run_triton_examples.py --list                # every known example + scope
    python scripts/run_triton_examples.py --all                 # also the out-of-scope ones
    python scripts/run_triton_examples.py --wait 30             # first wait for ServerLive

Success means: exit status 0 AND, for examples that print a success line, exactly one output
line containing ``PASS`` and it is the expected one (the same rule as Triton's qa/L0_grpc). The
marker matters: some examples exit 0 without printing it when their check fails
(grpc_explicit_int*_content_client.py, simple_grpc_async_infer_client.py).

``simple_grpc_model_control.py`` unloads ``simple`` (and overrides its config), so it always runs
last. ``simple_grpc_cudashm_client.py`` needs the ``cuda-python`` bindings and a GPU on the
client side; it is reported SKIP when ``cuda.bindings`` cannot be imported.
``reuse_infer_objects_client.py`` imports ``tritonclient.http`` even in gRPC mode, so it needs
``tritonclient[http]`` (gevent, geventhttpclient); it is reported SKIP when that import fails.
``--strict`` turns SKIP into failure.

Exit status: 0 when nothing failed, 1 when an example failed (or was skipped under
``--strict``), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EXAMPLES_DIR = REPO_ROOT / ".cache" / "triton-examples"
DEFAULT_URL = "127.0.0.1:8001"
DEFAULT_TIMEOUT_S = 60.0
TAIL_LINES = 15

# Scopes: "core" runs by default; "extra" runs by default too (variants of core examples);
# "out" (needs models or features outside microtune's scope) runs only when named or with --all.
CORE, EXTRA, OUT = "core", "extra", "out"


@dataclass(frozen=True)
class Example:
    name: str  # unique id used on the command line and in the table
    script: str  # file name inside --examples-dir
    args: tuple[str, ...] = ()  # extra flags, besides the URL flag
    url_flag: str | None = "-u"  # None: the example hard-codes localhost:8001
    marker: str | None = None  # expected success line prefix; None: exit status only
    scope: str = CORE
    needs_cuda: bool = False  # client side needs cuda-python (cuda.bindings) and a GPU
    needs_http: bool = False  # imports tritonclient.http: needs tritonclient[http] installed
    last: bool = False  # mutates server state: run after everything else
    note: str = ""
    models: tuple[str, ...] = ()


EXAMPLES: tuple[Example, ...] = (
    Example(
        "simple_grpc_health_metadata",
        "simple_grpc_health_metadata.py",
        models=("simple",),
        note="no PASS line: exit status only",
    ),
    Example(
        "simple_grpc_infer_client",
        "simple_grpc_infer_client.py",
        marker="PASS: infer",
        models=("simple",),
    ),
    Example(
        "simple_grpc_async_infer_client",
        "simple_grpc_async_infer_client.py",
        marker="PASS: Async infer",
        models=("simple",),
    ),
    Example(
        "simple_grpc_aio_infer_client",
        "simple_grpc_aio_infer_client.py",
        marker="PASS: grpc aio infer",
        models=("simple",),
    ),
    Example(
        "simple_grpc_string_infer_client",
        "simple_grpc_string_infer_client.py",
        marker="PASS: string",
        models=("simple_string", "simple_identity"),
    ),
    Example(
        "grpc_explicit_int_content_client",
        "grpc_explicit_int_content_client.py",
        marker="PASS: explicit int",
        models=("simple",),
    ),
    Example(
        "grpc_explicit_int8_content_client",
        "grpc_explicit_int8_content_client.py",
        marker="PASS: explicit int8",
        models=("simple_int8",),
    ),
    Example(
        "grpc_explicit_byte_content_client",
        "grpc_explicit_byte_content_client.py",
        marker="PASS: explicit string",
        models=("simple_string",),
    ),
    Example(
        "simple_grpc_custom_args_client",
        "simple_grpc_custom_args_client.py",
        marker="PASS: CustomArgs",
        models=("simple",),
    ),
    Example(
        "simple_grpc_keepalive_client",
        "simple_grpc_keepalive_client.py",
        marker="PASS: KeepAlive",
        models=("simple",),
    ),
    Example(
        "simple_grpc_shm_client",
        "simple_grpc_shm_client.py",
        marker="PASS: system shared memory",
        models=("simple",),
    ),
    Example(
        "simple_grpc_shm_string_client",
        "simple_grpc_shm_string_client.py",
        marker="PASS: system shared memory",
        models=("simple_string",),
    ),
    Example(
        "reuse_infer_objects_client",
        "reuse_infer_objects_client.py",
        args=("-i", "grpc"),
        needs_http=True,
        models=("simple",),
        note="no PASS line: exit status only; imports tritonclient.http",
    ),
    Example(
        "simple_grpc_cudashm_client",
        "simple_grpc_cudashm_client.py",
        marker="PASS: cudashm",
        needs_cuda=True,
        models=("simple",),
        note="client needs cuda-python + GPU",
    ),
    Example(
        "simple_grpc_infer_client[gzip]",
        "simple_grpc_infer_client.py",
        args=("-C", "gzip"),
        marker="PASS: infer",
        scope=EXTRA,
        models=("simple",),
        note="gzip-compressed requests",
    ),
    Example(
        "simple_grpc_infer_client[deflate]",
        "simple_grpc_infer_client.py",
        args=("-C", "deflate"),
        marker="PASS: infer",
        scope=EXTRA,
        models=("simple",),
        note="deflate-compressed requests; qa/L0_grpc runs this variant",
    ),
    Example(
        "simple_grpc_aio_infer_client[gzip]",
        "simple_grpc_aio_infer_client.py",
        args=("-C", "gzip"),
        marker="PASS: grpc aio infer",
        scope=EXTRA,
        models=("simple",),
        note="gzip-compressed requests",
    ),
    Example(
        "simple_grpc_infer_client[timeout]",
        "simple_grpc_infer_client.py",
        args=("-t", "10"),
        marker="PASS: infer",
        scope=EXTRA,
        models=("simple",),
        note="first infer carries a 10 s gRPC deadline",
    ),
    Example(
        "simple_grpc_model_control",
        "simple_grpc_model_control.py",
        marker="PASS: model control",
        last=True,
        models=("simple",),
        note="needs exactly 8 models in the repository index; unloads 'simple'",
    ),
    # --- outside microtune's scope: listed so --list documents them; run with --all / by name.
    Example(
        "simple_grpc_sequence_sync_infer_client",
        "simple_grpc_sequence_sync_infer_client.py",
        marker="PASS: Sequence",
        scope=OUT,
        models=("simple_sequence",),
        note="sequence batching",
    ),
    Example(
        "simple_grpc_sequence_sync_infer_client[dyna]",
        "simple_grpc_sequence_sync_infer_client.py",
        args=("-d",),
        marker="PASS: Sequence",
        scope=OUT,
        models=("simple_dyna_sequence", "simple_string_dyna_sequence"),
        note="dynamic sequence batching",
    ),
    Example(
        "simple_grpc_sequence_stream_infer_client",
        "simple_grpc_sequence_stream_infer_client.py",
        marker="PASS: Sequence",
        scope=OUT,
        models=("simple_sequence",),
        note="sequence batching over ModelStreamInfer",
    ),
    Example(
        "simple_grpc_aio_sequence_stream_infer_client",
        "simple_grpc_aio_sequence_stream_infer_client.py",
        marker="PASS: Sequence",
        scope=OUT,
        models=("simple_sequence",),
        note="sequence batching over ModelStreamInfer (aio)",
    ),
    Example(
        "simple_grpc_custom_repeat",
        "simple_grpc_custom_repeat.py",
        marker="PASS: Decoupled API",
        scope=OUT,
        models=("repeat_int32",),
        note="decoupled model over ModelStreamInfer",
    ),
    Example(
        "grpc_client",
        "grpc_client.py",
        marker="PASS",
        scope=OUT,
        models=("densenet_onnx",),
        note="densenet_onnx, raw FP32 [3,224,224]",
    ),
    Example(
        "memory_growth_test",
        "memory_growth_test.py",
        args=("-i", "grpc", "-r", "10"),
        url_flag=None,
        scope=OUT,
        models=("custom_identity_int32",),
        note="hard-codes localhost:8001",
    ),
)

BY_NAME = {e.name: e for e in EXAMPLES}


@dataclass
class Outcome:
    example: Example
    status: str  # PASS / FAIL / SKIP
    rc: int | None
    seconds: float
    detail: str
    output: str


def importable(python: str, module: str) -> bool:
    """Whether the interpreter that runs the examples can import ``module``.

    Probed in a child process: importing e.g. ``tritonclient.http`` pulls in gevent, which has
    no business in this process.
    """
    try:
        probe = subprocess.run(
            [python, "-c", f"import {module}"],
            capture_output=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def build_command(
    example: Example, python: str, examples_dir: Path, url: str, example_verbose: bool
) -> list[str]:
    cmd = [python, str(examples_dir / example.script)]
    if example_verbose:
        cmd.append("-v")
    if example.url_flag is not None:
        cmd += [example.url_flag, url]
    cmd += list(example.args)
    return cmd


def judge(example: Example, rc: int, output: str) -> tuple[bool, str]:
    lines = output.splitlines()
    pass_lines = [ln for ln in lines if "PASS" in ln]
    if rc != 0:
        return False, f"exit status {rc}"
    if example.marker is None:
        failed = [ln for ln in lines if ln.lstrip().startswith("FAILED")]
        if failed:
            return False, f"printed {failed[0].strip()!r}"
        return True, "exit status 0"
    hits = [ln for ln in pass_lines if ln.strip().startswith(example.marker)]
    if not hits:
        return False, f"exit status 0 but no {example.marker!r} line"
    if len(pass_lines) != 1:
        return False, f"{len(pass_lines)} lines contain 'PASS' (expected exactly 1)"
    return True, hits[0].strip()


def run_one(
    example: Example, args: argparse.Namespace, examples_dir: Path, have: dict[str, bool]
) -> Outcome:
    script = examples_dir / example.script
    if not script.is_file():
        return Outcome(example, "FAIL", None, 0.0, f"missing {script}", "")
    if example.needs_cuda and not have["cuda"]:
        return Outcome(example, "SKIP", None, 0.0, "cuda.bindings not importable", "")
    if example.needs_http and not have["http"]:
        return Outcome(example, "SKIP", None, 0.0, "tritonclient.http not importable", "")
    cmd = build_command(example, args.python, examples_dir, args.url, args.example_verbose)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=args.timeout,
            cwd=str(examples_dir),
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raw = exc.output or b""
        out = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        return Outcome(
            example,
            "FAIL",
            None,
            time.monotonic() - start,
            f"timed out after {args.timeout:g} s",
            out,
        )
    seconds = time.monotonic() - start
    out = proc.stdout.decode("utf-8", "replace")
    ok, detail = judge(example, proc.returncode, out)
    return Outcome(example, "PASS" if ok else "FAIL", proc.returncode, seconds, detail, out)


def wait_for_server(url: str, deadline_s: float) -> bool:
    import tritonclient.grpc as grpcclient  # the reference client, not example code

    end = time.monotonic() + deadline_s
    while True:
        try:
            client = grpcclient.InferenceServerClient(url=url)
            try:
                if client.is_server_live(client_timeout=2.0):
                    return True
            finally:
                client.close()
        except Exception:
            pass
        if time.monotonic() >= end:
            return False
        time.sleep(0.5)


def select(names: Sequence[str], run_all: bool, examples_dir: Path) -> list[Example]:
    if names:
        chosen: list[Example] = []
        for raw in names:
            name = raw[:-3] if raw.endswith(".py") else raw
            if name in BY_NAME:
                chosen.append(BY_NAME[name])
            elif (examples_dir / f"{name}.py").is_file():
                # Unknown to this table: run it with just the URL flag, judge by exit status.
                chosen.append(Example(name, f"{name}.py", scope=OUT, note="unlisted"))
            else:
                raise SystemExit(f"error: unknown example {raw!r} (see --list)")
    else:
        chosen = [e for e in EXAMPLES if run_all or e.scope != OUT]
    # Stable: keep the given order but move state-mutating examples to the end.
    return [e for e in chosen if not e.last] + [e for e in chosen if e.last]


def print_list() -> None:
    width = max(len(e.name) for e in EXAMPLES)
    print(f"{'NAME':<{width}}  SCOPE  MODELS / NOTE")
    for e in EXAMPLES:
        extra = " ".join(e.args)
        note = ", ".join(m for m in e.models)
        if e.note:
            note += f"  ({e.note})"
        if extra:
            note += f"  [args: {extra}]"
        print(f"{e.name:<{width}}  {e.scope:<5}  {note}")


def print_table(outcomes: Sequence[Outcome]) -> None:
    width = max(len("EXAMPLE"), *(len(o.example.name) for o in outcomes))
    print()
    print(f"{'EXAMPLE':<{width}}  RESULT  {'TIME':>7}  DETAIL")
    print(f"{'-' * width}  ------  -------  {'-' * 40}")
    for o in outcomes:
        t = f"{o.seconds:6.1f}s" if o.rc is not None or o.seconds else "      -"
        print(f"{o.example.name:<{width}}  {o.status:<6}  {t:>7}  {o.detail}")
    counts = {s: sum(1 for o in outcomes if o.status == s) for s in ("PASS", "FAIL", "SKIP")}
    print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="*", help="examples to run (default: the default set)")
    parser.add_argument(
        "--examples-dir",
        type=Path,
        default=DEFAULT_EXAMPLES_DIR,
        help="directory holding the example .py files (default: .cache/triton-examples)",
    )
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"server gRPC address (default {DEFAULT_URL})"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds per example (default %(default)s)",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter that runs the examples (default: this one)",
    )
    parser.add_argument(
        "--all", dest="run_all", action="store_true", help="also run the out-of-scope examples"
    )
    parser.add_argument("--strict", action="store_true", help="count SKIP as failure")
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to SECONDS for ServerLive to answer true",
    )
    parser.add_argument(
        "--example-verbose",
        action="store_true",
        help="pass -v to each example (as Triton's QA does)",
    )
    parser.add_argument(
        "--show-output",
        choices=("fail", "all", "none"),
        default="fail",
        help="print example output for failures (default), all, or none",
    )
    parser.add_argument("--list", action="store_true", help="list known examples and exit")
    args = parser.parse_args(argv)

    if args.list:
        print_list()
        return 0

    examples_dir: Path = args.examples_dir
    if not examples_dir.is_absolute():
        examples_dir = (Path.cwd() / examples_dir).resolve()
    if not examples_dir.is_dir():
        print(
            f"error: examples dir {examples_dir} does not exist; copy the example .py files "
            "from triton-inference-server/client src/python/examples/ there",
            file=sys.stderr,
        )
        return 2

    try:
        chosen = select(args.names, args.run_all, examples_dir)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2

    if args.wait > 0 and not wait_for_server(args.url, args.wait):
        print(f"error: server at {args.url} not live after {args.wait:g} s", file=sys.stderr)
        return 1

    have = {
        "cuda": any(e.needs_cuda for e in chosen)
        and importable(args.python, "cuda.bindings.runtime"),
        "http": any(e.needs_http for e in chosen) and importable(args.python, "tritonclient.http"),
    }
    outcomes: list[Outcome] = []
    for example in chosen:
        print(f"--- {example.name} ...", flush=True)
        outcome = run_one(example, args, examples_dir, have)
        outcomes.append(outcome)
        print(f"--- {example.name}: {outcome.status} ({outcome.detail})", flush=True)
        show = args.show_output == "all" or (
            args.show_output == "fail" and outcome.status == "FAIL"
        )
        if show and outcome.output:
            tail = outcome.output.splitlines()
            if args.show_output == "fail":
                tail = tail[-TAIL_LINES:]
            for line in tail:
                print(f"    | {line}")

    print_table(outcomes)
    failed = any(o.status == "FAIL" for o in outcomes)
    skipped = any(o.status == "SKIP" for o in outcomes)
    return 1 if failed or (args.strict and skipped) else 0


if __name__ == "__main__":
    sys.exit(main())
