"""Run train.py or the extractor and SIGKILL it at an exact point: just before the N-th rename
whose destination ends with a given path. Every durable write of the pipeline ends in such a
rename (atomic writes, orbax's checkpoint commit), so this reaches the moments a real kill could
hit: mid-checkpoint, mid-shard, mid-manifest.

    python tests/kill_at.py DEST_SUFFIX N {train,extract} ARGS...
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def kill_before_rename(suffix: str, nth: int) -> None:
    calls = {"n": 0}

    def wrap(rename):
        def renamed(src, dst, *args, **kwargs):
            if os.fsdecode(dst).endswith(suffix):
                calls["n"] += 1
                if calls["n"] == nth:
                    os.kill(os.getpid(), signal.SIGKILL)
            return rename(src, dst, *args, **kwargs)

        return renamed

    os.rename, os.replace = wrap(os.rename), wrap(os.replace)


if __name__ == "__main__":
    suffix, nth, program, *argv = sys.argv[1:]
    kill_before_rename(suffix, int(nth))
    if program == "train":
        import train

        sys.exit(train.main(argv))
    from extract.cli import main

    sys.exit(main(argv))
