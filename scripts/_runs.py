"""Shared by the ablation scripts: run a spinelm command with its output appended to a log."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` (output appended to ``log``); its wall time in seconds. Exits naming the log on failure."""
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}; see {log}")
    return time.time() - t0
