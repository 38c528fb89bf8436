"""`python -m svdzip …` is the `svdzip` command (and what torchrun runs: `torchrun -m svdzip …`)."""

from svdzip.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
