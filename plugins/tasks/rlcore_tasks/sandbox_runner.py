"""The first code to run inside a sandbox. Its source follows `plaindata`'s in one program (standard
library only, no imports beyond the interpreter's own modules: it runs on the sandbox's interpreter).

Under bubblewrap, `sandbox.BOOT` (`python -I -S -c BOOT JOB_FD`) reads the job (`marshal`led, which
needs no import, unlike json's ~10 ms) from JOB_FD, with this code in it (compiled by the trainer when
the sandbox runs the trainer's own interpreter, else as source), and calls `main(job)`: it applies the
resource limits, drops to the unprivileged uid when bwrap started it as root, tells the trainer that the
sandbox is up (one byte on the job's `ready_fd`, then closed: nothing the program does later can unsay
it), and runs the job in this process:
- a script: the program as `__main__`;
- calls: the solution as module `solution`, then each requested operation on it (`serve`), each result
  written to `results_fd` as plain data the moment it is known. The tests themselves never come here.

`serve` is also what a SandboxFusion service runs, with results written as hex lines on stdout.
"""

import builtins
import os
import resource
import sys

RESULT_LINE = b"@@rlcore-result "
"""Prefix of a result line when results share stdout with the program (SandboxFusion)."""
MAX_ITEMS = 1 << 20
"""Most items taken from an iterator or generator that a solution returns."""


def standin(obj):
    """What a value of no plain type is sent as: a subclass of a plain type as that type (a Counter as a
    dict, a namedtuple as a tuple, an IntEnum as an int), an iterator or generator as its items; NotPlain
    for anything else."""
    for base in (int, float, complex, str, bytes, tuple, list, dict, set, frozenset):
        if isinstance(obj, base):
            return base(obj)
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    if hasattr(type(obj), "__next__") and hasattr(type(obj), "__iter__"):
        items = []
        for item in obj:
            items.append(item)
            if len(items) > MAX_ITEMS:
                raise NotPlain("an endless iterator")
        return iterator(items)
    raise NotPlain(type(obj).__name__)


def encode_result(obj, index, budget):
    """The plain-data encoding of result `index`, or its reference when a part of it is not plain data
    (the tests may pass a reference back, never look into it)."""
    try:
        return encode(obj, standin, budget)
    except (NotPlain, RecursionError):
        return extension(b"R", index)


def serve(solution, imports, ops, write, budget):
    """Run `solution` as module `solution` (then `imports`, the tests' import lines), then every encoded
    operation of `ops` in order: ("call", target, args, kwargs), ("getattr", target, name) or
    ("setattr", target, name, value), a target being a name in the solution's namespace or the reference
    of an earlier result. Each result, or the builtin class of the exception raised, goes to `write(bytes)`."""
    namespace = {"__name__": "solution", "__builtins__": builtins}
    failure = None
    try:
        exec(compile(solution, "solution.py", "exec"), namespace)  # noqa: S102 - this is the sandbox
        exec(compile(imports, "imports.py", "exec"), namespace)  # noqa: S102
    except BaseException as e:  # noqa: BLE001 - every operation then reports it
        failure = e
    results = {}
    refs = {b"R": results.__getitem__, b"G": lambda name: getattr(builtins, name)}
    for index, op in enumerate(ops):
        try:
            if failure is not None:
                raise failure
            kind, target, *rest = decode(op, refs)
            if type(target) is str:
                if target not in namespace and not hasattr(builtins, target):
                    raise NameError(target)
                target = namespace[target] if target in namespace else getattr(builtins, target)
            if kind == "call":
                value = target(*rest[0], **rest[1])
            elif kind == "getattr":
                value = getattr(target, rest[0])
            else:
                setattr(target, rest[0], rest[1])
                value = None
            results[index] = value
            frame = encode_result(value, index, budget)
        except BaseException as e:  # noqa: BLE001 - the test decides what an exception means
            frame = extension(b"E", builtin_class(type(e)))
        write(frame)


def builtin_class(cls):
    """The name of the nearest builtin class of exception class `cls` (ValueError for a subclass of it)."""
    for base in getattr(cls, "__mro__", ()):
        if getattr(builtins, getattr(base, "__name__", ""), None) is base:
            return base.__name__
    return "BaseException"


def serve_lines(solution, imports, ops, budget):
    """`serve`, each result written on stdout as a line of RESULT_LINE and its hex (for a service that
    returns nothing but the program's output)."""
    def write(frame):
        try:
            sys.stdout.flush()
        except BaseException:  # noqa: BLE001 - the solution's own stdout, whatever it made of it
            pass
        write_all(1, b"\n" + RESULT_LINE + frame.hex().encode() + b"\n")

    serve(solution, imports, ops, write, budget)


def write_all(fd, data):
    """Write all of `data` to `fd`."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def main(job):
    """Run `job` (see the module doc)."""
    for name, (soft, hard) in job["limits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    uid = job["uid"]
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    builtins.exit = builtins.quit = sys.exit  # what `site` would add; the interpreter runs with -S
    sys.argv = ["main.py"]
    os.write(job["ready_fd"], b"R")
    os.close(job["ready_fd"])
    if "program" in job:
        os.close(job["results_fd"])
        code = compile(job["program"], "main.py", "exec")
        exec(code, {"__name__": "__main__", "__builtins__": builtins})  # noqa: S102 - this is the sandbox
        return
    fd = job["results_fd"]
    serve(job["solution"], job["imports"], job["ops"], lambda frame: write_all(fd, b"%d:" % len(frame) + frame),
          job["budget"])

