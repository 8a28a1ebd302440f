"""`python -m milan ...` and `torchrun -m milan ...` run the CLI."""

from milan.cli import main

if __name__ == "__main__":
    main()
