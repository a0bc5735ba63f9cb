"""The ``srdiff`` command line. Each feature adds its subcommands from its own module, which exposes
``add_commands(subparsers)``; the parsers set ``func`` to the function that runs the command."""

import argparse
import importlib
import sys

# Modules that contribute subcommands, in the order ``srdiff --help`` lists them.
COMMAND_MODULES: list[str] = ["srdiff.trainer.cli", "srdiff.highlighter.cli"]


def _info(args) -> None:
    """Print versions and which fast paths this installation has."""
    import torch

    from srdiff import __version__, _extension

    print(f"srdiff {__version__}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"extension srdiff._C: {'loaded' if _extension.HAS_EXT else 'not used: ' + str(_extension.WHY_NOT)}")
    print(f"  CUDA backend compiled: {_extension.has_cuda_backend()}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed (the reference paths serve)")
    print(f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="srdiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("info", help="versions and available fast paths").set_defaults(func=_info)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = args.func(args)
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
