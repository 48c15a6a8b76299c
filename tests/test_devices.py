"""What dfmkit.devices reads of the machine: the memory a new allocation can take on the host, a container's
memory cgroup (v2 and v1) included."""

from __future__ import annotations

from pathlib import Path

from dfmkit import devices

GiB = 2**30


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_cgroup_v2_room_is_the_limit_less_usage_with_inactive_page_cache_free(tmp_path):
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/job/step\n")
    mount = tmp_path / "cgroup"
    _write(mount, {"job/step/memory.max": f"{8 * GiB}\n", "job/step/memory.current": f"{5 * GiB}\n",
                   "job/step/memory.stat": f"anon {4 * GiB}\ninactive_file {1 * GiB}\nactive_file 5\n"})
    assert devices.cgroup_memory_room(proc, mount) == 4 * GiB
    # an ancestor with less room decides; "max" is no limit
    _write(mount, {"job/memory.max": f"{6 * GiB}\n", "job/memory.current": f"{5 * GiB}\n",
                   "memory.max": "max\n", "memory.current": f"{50 * GiB}\n"})
    assert devices.cgroup_memory_room(proc, mount) == 1 * GiB
    _write(mount, {"job/memory.max": "max\n", "job/step/memory.max": "max\n"})
    assert devices.cgroup_memory_room(proc, mount) is None


def test_cgroup_v1_room_and_a_container_that_sees_its_cgroup_at_the_root(tmp_path):
    proc = tmp_path / "proc_cgroup"
    proc.write_text("5:devices:/\n4:memory:/process_api/abc\n0::/\n")
    mount = tmp_path / "cgroup"
    # inside a container the path may not exist below the mount: the mount's root is the container's cgroup
    _write(mount, {"memory/memory.limit_in_bytes": f"{3 * GiB}\n", "memory/memory.usage_in_bytes": f"{2 * GiB}\n",
                   "memory/memory.stat": f"cache 7\ntotal_inactive_file {GiB // 2}\n"})
    assert devices.cgroup_memory_room(proc, mount) == GiB + GiB // 2
    _write(mount, {"memory/memory.limit_in_bytes": "9223372036854771712\n"})  # v1's "no limit"
    assert devices.cgroup_memory_room(proc, mount) is None
    assert devices.cgroup_memory_room(tmp_path / "missing", mount) is None


def test_host_memory_is_the_smaller_of_meminfo_and_the_cgroup_room(monkeypatch):
    monkeypatch.setattr(devices, "cgroup_memory_room", lambda: None)
    meminfo = devices.host_available()
    assert meminfo is not None and meminfo > 0  # MemAvailable on Linux
    monkeypatch.setattr(devices, "cgroup_memory_room", lambda: 12345)
    assert devices.host_available() == 12345
    monkeypatch.setattr(devices, "cgroup_memory_room", lambda: 10**18)
    assert devices.host_available() == meminfo
