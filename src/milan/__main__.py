"""`python -m milan ...` and `torchrun -m milan ...` run the CLI."""

from milan.tools.cli import run

if __name__ == "__main__":
    run()
