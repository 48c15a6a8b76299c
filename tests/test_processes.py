"""A run killed with SIGKILL leaves none of its processes behind (loader workers, checkpoint writers), and a plain
training script needs no main guard (no process a save starts imports it again)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_data_harness import index_dataset, latent, run_recipe, text, write_info

from dfmkit.data.shards import ShardWriter

ROOT = Path(__file__).parents[1]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every live process (zombies are dead), from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (name) ": state, ppid, ...
            if fields[0] != "Z":
                found[int(entry)] = (int(fields[1]), fields[19])
    return found


def _descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every process below ``pid``."""
    table = _processes()
    out, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, started) in table.items():
            if ppid == parent and child not in out:
                out[child] = started
                todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


def test_a_run_killed_with_sigkill_leaves_no_child_process(tmp_path):
    (tmp_path / "data").mkdir()
    # Long captions travel with each batch (its samples' json) through the workers' pipe to the main process: the
    # batches a worker has made ahead fill the pipe, and a worker whose parent died waited on it for good.
    with ShardWriter(tmp_path / "data", "train-a") as writer:
        for k in range(48):
            writer.write(f"{k:09d}", latent(seed=k), text(4, k), {"caption": f"sample {k} " + "x" * 40_000})
    write_info(tmp_path / "data")
    index_dataset(tmp_path / "data")
    recipe = tmp_path / "run.toml"
    recipe.write_text(run_recipe(tmp_path / "data", tmp_path / "ck", num_workers=2, train_iters=100_000, save_interval=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", "import sys; from dfmkit.cli import main; sys.exit(main())", "run", str(recipe)]
    with open(tmp_path / "run.log", "w") as log:
        run = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        # Wait for the loader's two workers and the first saves (whose writers megatron forks).
        deadline = time.monotonic() + 45
        children: dict[int, str] = {}
        while time.monotonic() < deadline and run.poll() is None:
            children = _descendants(run.pid)
            lines = [_cmdline(pid) for pid in children]
            workers = sum("dfmkit.cli" in line for line in lines)
            if workers >= 2 and (tmp_path / "ck" / "latest").exists():
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the run did not start its children: {children} "
                                 f"{(tmp_path / 'run.log').read_text()[-3000:]}")
        os.kill(run.pid, signal.SIGKILL)  # the main process only, not its process group
        run.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            table = _processes()
            alive = {pid: _cmdline(pid) for pid, started in children.items()
                     if pid in table and table[pid][1] == started}
            if not alive:
                break
            time.sleep(0.25)
        assert not alive, f"left running after the run was killed: {alive}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)


SCRIPT_WITHOUT_MAIN_GUARD = """
import dfmkit
from dfmkit.train.loop import train

job = dfmkit.build("quickstart_digits", ["data.mock=true", "train.train_iters=2", "optim.warmup_iters=1",
                                         "checkpoint.save_interval=1", "checkpoint.dir={checkpoints}",
                                         "validation.interval=0", "logging.progress=false", "model.num_layers=1"])
print("step", train(job)["step"])
"""


def test_a_plain_script_without_a_main_guard_trains_and_saves(tmp_path):
    """The README's Python example as a plain script (no ``if __name__ == "__main__":``): no process a save starts
    imports the script again (megatron spawned a Manager for its write results, which ran the training again)."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT_WITHOUT_MAIN_GUARD.format(checkpoints=tmp_path / "ck"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("step 2") == 1  # trained once, in the script's own process
    assert (tmp_path / "ck" / "latest").read_text().strip() == "2"
