"""``python -m extract``: see extract/cli.py."""

import sys

from extract.cli import main

sys.exit(main())
