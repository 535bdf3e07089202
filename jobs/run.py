"""The whole pipeline: `ray job submit -- python jobs/run.py --input SRC --run-dir RUN [--config FILE]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a job working dir

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
