"""The ``moeflow`` command line.

Each sub-command has one module in this package that defines its arguments
(``add_arguments(parser)``) and ``run(args) -> int``, which drives the library or an
application of :mod:`moeflow.apps`. Modules are imported only when their
command runs, so ``moeflow --help`` stays fast and never imports torch.

Every command runs inside one error boundary (:func:`main`): moeflow's typed errors, ``OSError``
and interrupts become one line on stderr and a documented exit code; ``--debug`` (anywhere on
the command line) shows the traceback instead.

Exit codes: 0 success; 1 runtime failure (a rank died, a collective timed out, a disk error, an
internal error); 2 bad input (a wrong argument or file, corrupt or crafted data, a layout that
cannot work; argparse's own usage errors too); 130 interrupted (Ctrl-C); 143 terminated
(SIGTERM).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import os
import signal
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("moeflow.cli.demo", "train a small character-level MoE language model on CPU"),
    "train": ("moeflow.cli.train", "train the demo model with expert parallelism (gloo/NCCL)"),
    "profile": ("moeflow.cli.profile", "time GEMMs and collectives, fit alpha-beta costs"),
    "plan": ("moeflow.cli.plan", "choose FSMoE pipeline degrees and compare with baselines"),
    "simulate": ("moeflow.cli.simulate", "simulate a plan; write a Chrome trace and a Gantt PNG"),
    "serve-bench": (
        "moeflow.cli.serve_bench",
        "serve the MoE model disaggregated (FinDEP, PPPipe, naive DEP) and time it",
    ),
    "serve": (
        "moeflow.cli.serve",
        "serve a checkpoint over an OpenAI-compatible HTTP API (continuous batching)",
    ),
    "load": (
        "moeflow.cli.load",
        "drive an OpenAI-compatible server with Poisson load; TTFT, TPOT, ITL, goodput",
    ),
    "geo": (
        "moeflow.cli.geo",
        "plan and run pipeline training over slow, uneven links (FusionLLM)",
    ),
    "bench": ("moeflow.cli.bench", "dissect a training or decode step by module and operator"),
    "compress": ("moeflow.cli.compress", "losslessly compress a safetensors checkpoint"),
    "decompress": ("moeflow.cli.compress", "restore a safetensors checkpoint from .mfz"),
    "inspect": ("moeflow.cli.compress", "show per-tensor ratio, entropy and codec of a .mfz"),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (mod, help_) in COMMANDS.items():
        try:
            if importlib.util.find_spec(mod) is not None:
                out[name] = (mod, help_)
        except ModuleNotFoundError:
            continue
    return out


def build_parser(
    commands: dict[str, tuple[str, str]] | None = None, load: str | None = None
) -> argparse.ArgumentParser:
    commands = _available() if commands is None else commands
    parser = argparse.ArgumentParser(
        prog="moeflow",
        description="moeflow: fast Mixture-of-Experts training and serving on PyTorch.",
        epilog="--debug (anywhere) prints tracebacks. Exit codes: 0 ok, 1 runtime failure, "
        "2 bad input, 130 interrupted, 143 terminated.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_) in commands.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == load:
            module = importlib.import_module(mod)
            ident = name.replace("-", "_")
            adder = getattr(module, f"add_{ident}_arguments", None) or module.add_arguments
            adder(p)
    return parser


EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
DEBUG_ENV = "MOEFLOW_DEBUG"

# OSErrors that mean "the path the user gave is wrong", not "the machine failed".
_BAD_PATH_ERRNOS = {
    errno.ENOENT,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EACCES,
    errno.EPERM,
    errno.ENAMETOOLONG,
    errno.ELOOP,
}


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt so ``finally`` blocks clean up."""


def _on_sigterm(signum, frame):
    raise Terminated()


def exit_code(exc: BaseException) -> int:
    """The documented exit code for an exception that reached the boundary."""
    from moeflow.errors import MoeflowError

    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, Terminated):
        return EXIT_TERMINATED
    if isinstance(exc, MoeflowError):
        return EXIT_BAD_INPUT if isinstance(exc, ValueError) else EXIT_FAILURE
    if isinstance(exc, OSError):
        return EXIT_BAD_INPUT if exc.errno in _BAD_PATH_ERRNOS else EXIT_FAILURE
    return EXIT_FAILURE


def error_line(exc: BaseException) -> str:
    """One line naming what went wrong (no traceback)."""
    from moeflow.errors import MoeflowError

    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, Terminated):
        return "terminated (SIGTERM)"
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename is not None else ""
        return f"{exc.strerror}{where}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, MoeflowError):
        return f"{type(exc).__name__}: {text}"
    if isinstance(exc, MemoryError):
        return f"out of memory: {text}"
    if isinstance(exc, ImportError) and "pip install" in text:  # a missing extra (_deps)
        return text
    return f"internal error: {type(exc).__name__}: {text} (run with --debug for the traceback)"


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    head, sep, tail = (
        (argv[: argv.index("--")], ["--"], argv[argv.index("--") + 1 :])
        if "--" in argv
        else (argv, [], [])
    )
    debug = "--debug" in head
    return [a for a in head if a != "--debug"] + sep + tail, debug


def main(argv: list[str] | None = None) -> int:
    """Run one command inside the error boundary and return its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    argv, debug = _split_debug(argv)
    if debug:
        os.environ[DEBUG_ENV] = "1"
    else:
        debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    old_term = None
    try:
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        return _run(argv)
    except SystemExit:
        raise
    except BaseException as exc:  # the boundary: every failure becomes one line and a code
        if debug:
            import traceback

            traceback.print_exc()
        else:
            print(f"moeflow: {error_line(exc)}", file=sys.stderr)
        return exit_code(exc)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        try:
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):  # reader went away (e.g. `| head`)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())


def _run(argv: list[str]) -> int:
    commands = _available()
    name = next((a for a in argv if not a.startswith("-")), None)
    load = name if name in commands else None
    parser = build_parser(commands, load=load)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(commands[args.command][0])
    ident = args.command.replace("-", "_")
    runner = getattr(module, f"run_{ident}", None) or module.run
    return int(runner(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
