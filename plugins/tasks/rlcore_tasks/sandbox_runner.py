"""The first code to run inside the bubblewrap sandbox, as `python -I -S -c <this source> FD`.

It reads its job (limits, uid, program; `marshal`led, which needs no import, unlike json's ~10-30 ms)
from file descriptor FD, applies the resource limits, drops to the unprivileged uid when bwrap started it
as root, and executes the program in this same process (one interpreter start per run). Standard library
only: it runs on the sandbox's interpreter.
"""

import builtins
import marshal
import os
import resource
import sys


def main() -> None:
    with os.fdopen(int(sys.argv[1]), "rb") as f:
        job = marshal.loads(f.read())
    for name, (soft, hard) in job["limits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    uid = job["uid"]
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    builtins.exit = builtins.quit = sys.exit  # what `site` would add; the interpreter runs with -S
    sys.argv = ["main.py"]
    code = compile(job["program"], "main.py", "exec")
    exec(code, {"__name__": "__main__", "__builtins__": builtins})  # noqa: S102 - this is the sandbox


main()
