"""A training run in its own process, for the tests: ``python tests/train_worker.py CONFIG.json``.

CONFIG holds {"recipe": {...}, "until_step": n or null, "out": path, "kill_during_save_at": step or null,
"block_data_after": {rank: n} or null, "stall_loader_after": n or null}. Writes {"losses": [...], "grad_norms": [...], "step": n} to ``out`` (rank 0);
a DfmkitError is printed as ``error: ...`` with exit code 2, as the CLI does. Under torchrun every rank runs it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path


def blocking_mock_data(recipe, after: int, marker: Path):
    """Mock data of this rank that never delivers its batch ``after`` (as a loader stuck on a hung file system
    does); ``marker`` gets this process's id when it starts waiting."""
    from dfmkit.data.mock import MockLoader

    class BlocksAfter(MockLoader):
        def __next__(self):
            if self.batches >= after:
                marker.write_text(str(os.getpid()))
                threading.Event().wait()
            return super().__next__()

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return BlocksAfter(recipe, dp_rank=rank, dp_size=world)  # data parallelism only


def stall_task_encoder(after: int, marker: Path) -> None:
    """The packed task encoder stops for good at its sample ``after`` (in the loader's worker process: as a read of a
    hung file system does); ``marker`` gets the process id then."""
    import itertools

    from dfmkit.components.task_encoders.packed import PackedTaskEncoder

    decode, decoded = PackedTaskEncoder._decode, itertools.count()

    def decode_or_stall(self, sample):
        if next(decoded) >= after:
            marker.write_text(str(os.getpid()))
            threading.Event().wait()
        return decode(self, sample)

    PackedTaskEncoder._decode = decode_or_stall  # not the cooker, which Energon requires to be stateless


def main() -> None:
    config = json.loads(open(sys.argv[1]).read())
    import dfmkit
    from dfmkit.errors import DfmkitError
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
    stall = config.get("stall_loader_after")
    if stall is not None:
        stall_task_encoder(stall, Path(config["out"]).with_name("stalled"))
    job = dfmkit.build(config["recipe"])
    data = None
    rank = int(os.environ.get("RANK", 0))
    blocks = {int(r): n for r, n in (config.get("block_data_after") or {}).items()}
    if blocks:
        marker = Path(config["out"]).with_name(f"blocking.rank{rank}")
        data = blocking_mock_data(job.recipe, blocks.get(rank, 1 << 40), marker)
    try:
        result = train(job, until_step=config.get("until_step"), data=data)
    except DfmkitError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    if rank == 0:
        with open(config["out"], "w") as f:
            json.dump({"losses": result["losses"], "grad_norms": result["grad_norms"], "step": result["step"]}, f)


if __name__ == "__main__":
    main()
