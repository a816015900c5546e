"""The ``moeflow`` command line.

Each sub-command lives next to the code it drives, in a module that defines
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their
command runs, so ``moeflow --help`` stays fast and never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("moeflow.demo", "train a small character-level MoE language model on CPU"),
    "train": ("moeflow.train", "train the demo model with expert parallelism (gloo/NCCL)"),
    "profile": ("moeflow.perf.profiler", "time GEMMs and collectives, fit alpha-beta costs"),
    "plan": ("moeflow.plan.cli", "choose FSMoE pipeline degrees and compare with baselines"),
    "simulate": ("moeflow.sim.cli", "simulate a plan; write a Chrome trace and a Gantt PNG"),
    "compress": ("moeflow.compress.cli", "losslessly compress a safetensors checkpoint"),
    "decompress": ("moeflow.compress.cli", "restore a safetensors checkpoint from .mfz"),
    "inspect": ("moeflow.compress.cli", "show per-tensor ratio, entropy and codec of a .mfz"),
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


def build_parser(commands: dict[str, tuple[str, str]] | None = None,
                 load: str | None = None) -> argparse.ArgumentParser:
    commands = _available() if commands is None else commands
    parser = argparse.ArgumentParser(
        prog="moeflow",
        description="moeflow: fast Mixture-of-Experts training and serving on PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_) in commands.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == load:
            module = importlib.import_module(mod)
            adder = getattr(module, f"add_{name}_arguments", None) or module.add_arguments
            adder(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = _available()
    name = next((a for a in argv if not a.startswith("-")), None)
    load = name if name in commands else None
    parser = build_parser(commands, load=load)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(commands[args.command][0])
    runner = getattr(module, f"run_{args.command}", None) or module.run
    return int(runner(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
