"""A training run in its own process, for the tests: ``python tests/train_worker.py CONFIG.json``.

CONFIG holds {"recipe": {...}, "until_step": n or null, "out": path, "kill_during_save_at": step or null}.
Writes {"losses": [...], "grad_norms": [...], "step": n} to ``out`` (rank 0). Under torchrun every rank runs it.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def main() -> None:
    config = json.loads(open(sys.argv[1]).read())
    import dfmkit
    from dfmkit.train import checkpoint
    from dfmkit.train.loop import train

    kill_at = config.get("kill_during_save_at")
    if kill_at is not None:
        real_save = checkpoint.save_checkpoint

        def save_then_die(root, iteration, *args, **kwargs):
            if iteration == kill_at:
                # Let megatron write the sharded files, then die before the checkpoint is published.
                from megatron.core import dist_checkpointing

                real_dist_save = dist_checkpointing.save

                def dist_save_then_kill(state, directory, *a, **k):
                    real_dist_save(state, directory, *a, **k)
                    os.kill(os.getpid(), signal.SIGKILL)

                dist_checkpointing.save = dist_save_then_kill
            return real_save(root, iteration, *args, **kwargs)

        checkpoint.save_checkpoint = save_then_die
    result = train(dfmkit.build(config["recipe"]), until_step=config.get("until_step"))
    if int(os.environ.get("RANK", 0)) == 0:
        with open(config["out"], "w") as f:
            json.dump({"losses": result["losses"], "grad_norms": result["grad_norms"], "step": result["step"]}, f)


if __name__ == "__main__":
    main()
