"""Debian packages the tests need (chromium for the console, redis-server for the redis steps), installed with
apt-get when missing and we are root; otherwise the test fails saying how to install them, it does not skip."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def debian_binary(binary: Path, package: str) -> Path:
    """`binary`, installing `package` with `apt-get install` first when it is missing."""
    if binary.is_file():
        return binary
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise AssertionError(f"{binary} is missing: install it with `sudo apt-get install {package}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", package]):
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800, check=False)
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
        assert done.returncode == 0, f"`{' '.join(argv)}` failed (exit code {done.returncode}):\n{tail}"
    assert binary.is_file(), f"apt-get installed {package} but {binary} is missing"
    return binary
