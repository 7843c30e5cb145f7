"""Running a command and killing it mid-way, as a lent GPU's time limit or a user would."""

import os
import signal
import subprocess
import time


def kill_when(cmd, ready, cwd, timeout: float = 300) -> None:
    """Run ``cmd`` in its own process group; SIGKILL the group as soon as ``ready()`` is
    true (polled every 0.1 s), when the command exits, or after ``timeout`` seconds."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if ready():
                break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
