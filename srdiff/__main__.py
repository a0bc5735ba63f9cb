"""``python -m srdiff ...`` (also what ``torchrun -m srdiff train ...`` runs)."""

from srdiff.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
