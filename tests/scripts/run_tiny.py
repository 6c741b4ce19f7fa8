"""A small run for the reproducibility tests: dropout, shuffling, accumulation 2, 2 workers, evaluation.

Usage: python tests/scripts/run_tiny.py DIR [signal_at=MICRO] [sleep=SECONDS]
Writes DIR/digest.txt (the final state's tree_digest) when it finishes.
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
from helpers.tiny import setup  # noqa: E402

from functrain.checkpoint import tree_digest  # noqa: E402
from functrain.shell import train  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    directory = sys.argv[1]
    opts = dict(a.split("=", 1) for a in sys.argv[2:])
    signal_at = int(opts.get("signal_at", -1))
    pause = float(opts.get("sleep", 0))
    state, config = setup(accumulate=2, num_workers=2, steps=12, eval_every=3, checkpoint_every=1,
                          async_checkpoint=True, keep_last=2, checkpoint_dir=directory)
    inner = config.step

    def step(s, batch):
        out = inner(s, batch)
        if int(out.micro_step) == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(pause)
        return out

    final = train(state, config.replace(step=step))
    with open(os.path.join(directory, "digest.txt"), "w") as f:
        f.write(tree_digest(final))


if __name__ == "__main__":
    main()
