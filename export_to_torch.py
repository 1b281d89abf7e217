"""Export a trained run (`runs/<name>/`) to SAELens format for SAEBench.

    python export_to_torch.py RUN_DIR [--out DIR] [--replace] [--force]

The command line of `jax_sae.export.saelens`, which documents the format and the guarantees.
"""

import sys

from jax_sae.export.saelens import main

if __name__ == "__main__":
    sys.exit(main())
