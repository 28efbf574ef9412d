"""Run the speed and memory benchmark (the same as `recurrent-depth bench`); see benchmarks/README.md.

python benchmarks/run_bench.py --preset tiny,50m --out bench.json
"""

import sys

from modeling_recurrent.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
