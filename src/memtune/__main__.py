"""`python -m memtune` and `torchrun --nproc-per-node N -m memtune learn ...`: the `memtune` CLI."""

import sys

from memtune.cli import main

if __name__ == "__main__":
    sys.exit(main())
