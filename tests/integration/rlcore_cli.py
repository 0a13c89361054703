"""Running the real `rlcore` command in a subprocess, as a user would."""

import subprocess
import sys

RLCORE = [sys.executable, "-m", "rlcore"]


def rlcore(*args, cwd=None, env=None, timeout=900) -> subprocess.CompletedProcess:
    """Run `rlcore ARGS...`, failing the test with its output if it exits non-zero."""
    proc = subprocess.run([*RLCORE, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, f"rlcore {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc
