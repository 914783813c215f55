"""``python benchmarks/bench.py [options]``: the same as ``python -m lit_dar.bench`` (see README.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_dar.bench import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
