"""python -m dlmjax.train CONFIG.yaml [section.key=value ...] [--dry-run] (see dlmjax/train/cli.py)."""

import sys

from dlmjax.train.cli import main

sys.exit(main())
