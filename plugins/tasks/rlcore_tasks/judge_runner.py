"""The judge process: runs a problem's tests (HumanEval's `check`, MBPP's asserts) where the solution
cannot reach, each call into the solution answered from the results of a sandbox run. Its source
follows `plaindata`'s and `sandbox_runner`'s in one program (`python -I -S -c <source> IN_FD OUT_FD ...`,
see `judge_main`); standard library only.

A test sees the solution's names (the function under test, its classes) as stand-ins (`Name`): calling
one, or reading or setting an attribute of one, is an operation, encoded as plain data and replayed in
the sandbox in order. A pass over the tests (`judge`) is given the operations of the last sandbox run and
their results: an operation equal to one of them is answered from its result (plain data, decoded into
builtin values, a `Remote` reference for an object that is not plain data, or the exception it raised);
one that is not is answered with an unknown `Remote` and appended for the next run, which replays the
whole list (operations keep their places, so references to results stay valid). A test whose
operations were all answered gets its verdict (it passes when it raises nothing); a test that met an
unknown result waits for the next pass.
Asserts are rewritten so that, in a test waiting anyway, a failing assert does not stop it: the
operations after it are recorded too, so that most problems need a single sandbox run.

Looking into a `Remote` (comparing, hashing, iterating, converting it) makes the test wait when its
result is unknown, and fails the test for good when it is known not to be plain data: only plain data
is compared here. Each test runs with `random` seeded by its index, so that its operations are the same
in every pass.
"""

import ast
import builtins
import os
import random
import resource
import sys

PASSED, FAILED, WAITING = 1, 0, -1
BUILTIN_NAMES = frozenset(dir(builtins))
WAITING_CHECK = "__rlcore_waiting__"
"""The judge namespace's function that rewritten asserts ask whether the test already waits."""
CACHE = 256
"""Problems whose compiled tests are kept."""


class Pending(BaseException):
    """A test looked into a result that the sandbox has not computed yet."""


class NoResult(BaseException):
    """The sandbox gave no result for an operation (it ended, timed out, or wrote something not plain)."""


class NotPlainData(BaseException):
    """A test looked into a result that is not plain data, or passed the solution something it cannot send."""


class RemoteError(Exception):
    """The sandbox named an exception class that is not a builtin one (its name is the message)."""


class Session:
    """The operations of one pass over a problem's tests, and the answers to them."""

    def __init__(self, known, results):
        self.results = results
        self.ops = list(known)
        self.unused = {}  # encoded operation -> indices in `known` not yet answered in this pass, in order
        for index, data in enumerate(known):
            self.unused.setdefault(data, []).append(index)
        self.waiting = False
        self.failed = False
        self.closed = False

    def op(self, *op):
        """Answer operation `op` ("call" / "getattr" / "setattr", target, ...): from the result of the first
        equal operation of the last run not used yet in this pass, else as unknown, appended for the next run."""
        if self.closed:
            raise NotPlainData("a stand-in from an earlier pass")
        try:
            data = encode(op, self.argument)
        except NotPlain as e:
            self.failed = True
            raise NotPlainData(str(e)) from None
        if self.unused.get(data):
            return self.answer(self.unused[data].pop(0))
        self.ops.append(data)
        self.waiting = True
        return Remote(self, len(self.ops) - 1, False)

    def argument(self, obj):
        """An argument of no plain type: a result kept in the sandbox, or a builtin (by name)."""
        if type(obj) is Remote and obj._session is self:
            return extension(b"R", obj._index)
        name = getattr(obj, "__name__", None)
        if type(name) is str and getattr(builtins, name, None) is obj:
            return extension(b"G", name)
        raise NotPlain(f"cannot send a {type(obj).__name__} to the solution")

    def answer(self, index):
        frame = self.results[index] if index < len(self.results) else None
        if frame is None:
            self.failed = True
            raise NoResult(f"no result for operation {index}")
        try:
            return decode(frame, {b"R": lambda j: self.reference(j, index), b"E": self.raised})
        except DecodeError as e:
            self.failed = True
            raise NoResult(f"result {index} is not plain data: {e}") from None

    def reference(self, j, index):
        if j != index:
            raise DecodeError("a reference to another result")
        return Remote(self, index, True)

    def raised(self, name):
        """Raise what the solution raised: an instance of the builtin exception class `name` (made
        without its constructor, which some classes give required arguments), else RemoteError."""
        cls = getattr(builtins, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            raise cls.__new__(cls)
        raise RemoteError(name)

    def look(self, remote):
        """A test looked into `remote`: it waits (unknown result) or fails (not plain data)."""
        if remote._known or remote._session is not self:
            self.failed = True
            raise NotPlainData("a result that is not plain data")
        self.waiting = True
        raise Pending()


def _look(self, *args, **kwargs):
    object.__getattribute__(self, "_session").look(self)


class Remote:
    """An object of the solution's: an unknown result (not `_known`) or one that is not plain data."""

    __slots__ = ("_session", "_index", "_known")

    def __init__(self, session, index, known):
        object.__setattr__(self, "_session", session)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_known", known)

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._session.op("getattr", self, name)

    def __setattr__(self, name, value):
        self._session.op("setattr", self, name, value)

    def __call__(self, *args, **kwargs):
        return self._session.op("call", self, args, kwargs)


for _name in ("eq ne lt le gt ge hash bool len iter next reversed contains getitem setitem delitem str repr format "
              "bytes int float complex index round trunc floor ceil abs neg pos invert enter exit await aiter").split():
    setattr(Remote, f"__{_name}__", _look)
for _name in "add sub mul matmul truediv floordiv mod divmod pow lshift rshift and xor or".split():
    for _prefix in ("", "r", "i"):
        setattr(Remote, f"__{_prefix}{_name}__", _look)


class Name:
    """A name of the solution's namespace, as the tests see it: calls and attributes are operations."""

    __slots__ = ("_session", "_name")

    def __init__(self, session, name):
        object.__setattr__(self, "_session", session)
        object.__setattr__(self, "_name", name)

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._session.op("getattr", self._name, name)

    def __setattr__(self, name, value):
        self._session.op("setattr", self._name, name, value)

    def __call__(self, *args, **kwargs):
        return self._session.op("call", self._name, args, kwargs)

    def __repr__(self):
        return f"<solution's {self._name}>"

    def __eq__(self, other):
        raise NotPlainData("compared the solution's function")

    __hash__ = None


class _WaitingAsserts(ast.NodeTransformer):
    """`assert x` -> `try: assert x` / `except BaseException: if not __rlcore_waiting__(): raise`."""

    def visit_Assert(self, node):
        check = ast.If(test=ast.UnaryOp(op=ast.Not(), operand=ast.Call(
            func=ast.Name(id=WAITING_CHECK, ctx=ast.Load()), args=[], keywords=[])), body=[ast.Raise()], orelse=[])
        handler = ast.ExceptHandler(type=ast.Name(id="BaseException", ctx=ast.Load()), name=None, body=[check])
        return ast.copy_location(ast.Try(body=[node], handlers=[handler], orelse=[], finalbody=[]), node)


def _compile(source, filename, rewrite):
    tree = ast.parse(source, filename)
    if rewrite:
        tree = ast.fix_missing_locations(_WaitingAsserts().visit(tree))
    return tree, compile(tree, filename, "exec")


def _names(trees):
    """(names read, names bound) anywhere in `trees`."""
    read, bound = set(), set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, ast.arg):
                bound.add(node.arg)
            elif isinstance(node, ast.alias):
                bound.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, ast.ExceptHandler) and node.name:
                bound.add(node.name)
    return read, bound


class Problem:
    """A problem's tests, compiled: the prompt's code (HumanEval), setup code, the tests, and the names
    the tests read that only the solution defines, or that it defines over a builtin (`shadowed`: known
    from the problem's reference solution, never from the solution under test, which could otherwise
    take over the builtins the tests compute their expected values with)."""

    def __init__(self, prefix, entry_point, setup, tests, shadowed):
        self.entry_point = entry_point
        try:
            prefix_tree, self.prefix = _compile(prefix, "prompt.py", False)
        except SyntaxError:  # a prompt that is not a module by itself: its helpers are not available
            prefix_tree, self.prefix = ast.Module(body=[], type_ignores=[]), None
        setup_tree, self.setup = _compile(setup, "setup.py", True)
        compiled = [_compile(test, f"test_{i}.py", True) for i, test in enumerate(tests)]
        self.tests = [code for _, code in compiled]
        read, _ = _names([setup_tree, *(tree for tree, _ in compiled)])
        _, bound = _names([prefix_tree, setup_tree, *(tree for tree, _ in compiled)])
        self.remote = sorted((read - bound - BUILTIN_NAMES - {WAITING_CHECK}) | (read & set(shadowed)))


_problems = {}


def judge(problem, known, results):
    """One pass over `problem`'s tests ((prefix, entry point, setup, tests, shadowed)), given the operations of
    the last sandbox run (`known`, encoded) and its result frames for them (None: no result). Returns
    (PASSED / FAILED / WAITING per test, the operations for the next run: `known` and the new ones)."""
    compiled = _problems.get(problem)
    if compiled is None:
        if len(_problems) >= CACHE:
            _problems.clear()
        compiled = _problems[problem] = Problem(*problem)
    session = Session(known, results)
    namespace = {"__name__": "__main__", "__builtins__": builtins, WAITING_CHECK: lambda: session.waiting}
    namespace.update((name, Name(session, name)) for name in compiled.remote)
    random.seed(0)
    ready = _run(compiled.prefix, namespace)
    if compiled.entry_point:
        namespace[compiled.entry_point] = Name(session, compiled.entry_point)
    ready = ready and _run(compiled.setup, namespace)
    before = (session.waiting, session.failed or not ready)
    outcomes = []
    for index, code in enumerate(compiled.tests):
        session.waiting, session.failed = before
        random.seed(index)
        ok = _run(code, namespace)
        outcomes.append(WAITING if session.waiting else PASSED if ok and not session.failed else FAILED)
    session.closed = True
    return outcomes, session.ops


def _run(code, namespace):
    """Run `code`; whether it raised nothing."""
    if code is None:
        return True
    try:
        exec(code, namespace)  # noqa: S102 - the dataset's own tests, on plain data
    except BaseException:  # noqa: BLE001 - a test fails by raising anything
        return False
    return True


def read_frame(fd):
    """One `<length>:<bytes>` frame from `fd`; None at its end."""
    head = b""
    while not head.endswith(b":"):
        byte = os.read(fd, 1)
        if not byte or len(head) > 12:
            return None
        head += byte
    size, data = int(head[:-1]), b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def judge_main():
    """Serve requests until the trainer closes the pipe: each (problem, ops, results) gets (outcomes, ops).
    Arguments: IN_FD OUT_FD MEMORY_BYTES CPU_S (address space, and CPU seconds per request)."""
    in_fd, out_fd, memory, cpu_s = map(int, sys.argv[1:5])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    while True:
        request = read_frame(in_fd)
        if request is None:
            return
        usage = resource.getrusage(resource.RUSAGE_SELF)
        resource.setrlimit(resource.RLIMIT_CPU, (int(usage.ru_utime + usage.ru_stime) + cpu_s + 1, resource.RLIM_INFINITY))
        problem, known, results = decode(request)
        try:
            reply = judge(problem, known, results)
        except Exception as e:  # noqa: BLE001 - a problem whose tests cannot even be compiled
            reply = ("error", f"{type(e).__name__}: {e}")
        frame = encode(reply)
        write_all(out_fd, b"%d:" % len(frame) + frame)
