"""The ``srdiff`` command line. Each feature adds its subcommands from its own module, which exposes
``add_commands(subparsers)``; the parsers set ``func`` to the function that runs the command.

:func:`main` turns user errors (bad configs, data, paths, checkpoints: ``ValueError``, ``TypeError``,
``OSError``) into one line on stderr and exit code 2, Ctrl-C into one line and exit code 130; ``--debug``
shows the traceback instead. See docs/errors.md."""

import argparse
import importlib
import sys
import warnings

# Modules that contribute subcommands, in the order ``srdiff --help`` lists them.
COMMAND_MODULES: list[str] = ["srdiff.trainer.cli", "srdiff.highlighter.cli", "srdiff.repair_cli"]

# What a user's input can cause; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, OSError)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

DESCRIPTION = """\
Self-refining diffusion (arXiv 2512.08774): a flaw highlighter's Grad-CAM maps (FAMs)
steer DDPM training through noise amplification and FAM-modulated attention. Train a
diffusers UNet that way, sample and evaluate its checkpoints, train flaw highlighters
and draw their maps."""

EPILOG = """\
examples:
  srdiff demo     # what `make demo` runs: train, refine, sample, evaluate on digits
  srdiff train --config configs/demo.toml --data path/to/images --channels 3 \\
               --image-size 32 --steps 20000 --out-dir runs/mine

`srdiff COMMAND --help` lists a command's options. Errors print one line (exit
code 2); --debug shows the traceback. What is refused and why: docs/errors.md."""


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


def _add_debug_flag(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """``--debug`` on ``parser`` and every subcommand below it (so it may come before or after the command
    name), and each parser's ``prog`` as the ``_prog`` default that error messages start with."""
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="on an error, show the full traceback instead of one line")
    parser.set_defaults(_prog=parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_debug_flag(child)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="srdiff", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    sub.add_parser("info", help="versions and available fast paths").set_defaults(func=_info)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    _add_debug_flag(parser, top=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = args._prog
    show = warnings.formatwarning
    # warnings (data conversions, a run moved aside) as one line each, not file:line plus source
    warnings.formatwarning = lambda message, *_: f"{prog}: warning: {message}\n"
    try:
        status = args.func(args)
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        print(f"\n{prog}: interrupted" + (f"; {exc}" if str(exc) else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"{prog}: error: {str(exc) or type(exc).__name__}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        warnings.formatwarning = show
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
