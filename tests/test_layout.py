"""The package's layout stays readable (issue 19), checked with the standard library's ``ast`` only: its
import graph has no cycle and no upward import, no module name is used twice, each folder says what it
holds and what it never does, no folder holds more than about a dozen modules, the top of the package
only what every part uses, and a module over 400 lines says why at its top.

Imports inside functions count as much as those at the top: a lazy import is still a dependency."""

import ast
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The floors of the package, lowest first.  A room is a folder (pfrest/backend/) or a module at the top
# (pfrest/log.py).  A module imports from its own room or from a room on a lower floor, never from a room
# above, nor from another room of its own floor.
LAYERS = [
    # tracing: its global tracer, None unless configured; the conversation and the backend client use it
    ("pfrest", "pfrest.log", "pfrest.addresses", "pfrest.tracing"),   # pfrest: __version__ only
    ("pfrest.protocol",),       # Postfix's side, pure
    ("pfrest.config",),         # the config file: schema, loading, checks
    ("pfrest.system",),         # the event loop, sockets, privileges, systemd
    ("pfrest.backend",),        # the HTTP client
    # oauth2's bearer tokens: fetched with the HTTP client, handed to it through the cache's
    # for_endpoint; a folder of its own, as pfrest/backend/ holds its thirteen modules already
    ("pfrest.identity",),
    ("pfrest.cache",),          # the answer caches in front of it, local and shared
    ("pfrest.ops",),            # counters, metrics, health, control socket, their HTTP server
    ("pfrest.conversation",),   # one Postfix client's conversation: a request becomes an HTTP request
    ("pfrest.process",),        # serve's process(es): listener, arbiter, workers, signals
    ("pfrest.commands",),       # one module per command
    ("pfrest.cli",),            # parsing the command line, dispatching
    ("pfrest.__main__",),
]
MAX_MODULES = 13        # per folder, __init__.py not counted: "about a dozen"
MAX_TOP = 5             # modules at the top besides __init__.py and __main__.py
MAX_LINES = 400
SAYS_WHY = re.compile(r"\b(over|more than|longer than) 400 lines\b", re.I)
SAYS_NEVER = re.compile(r"\b(never|no|nothing|not|only)\b", re.I)


def modules(root=ROOT):
    """Dotted name -> path of every module of the package."""
    found = {}
    for path in sorted(Path(root, "pfrest").rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_graph(root=ROOT):
    """Module -> the package's modules it imports (a name imported from a package counts as the package,
    unless it is a module of it)."""
    mods = modules(root)
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    targets.add(_known(alias.name, mods))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    targets.add(sub if sub in mods else _known(module, mods))
        graph[name] = sorted(t for t in targets if t and t != name)
    return graph


def _known(name, mods):
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name if name.split(".")[0] == "pfrest" else None


def room(module):
    parts = module.split(".")
    return ".".join(parts[:2])


def floor(module):
    r = room(module)
    for i, rooms in enumerate(LAYERS):
        if r in rooms:
            return i
    raise AssertionError(f"{module}: its room {r} is on no floor of LAYERS; give it one")


def test_every_room_has_a_floor():
    for name in modules():
        floor(name)


def test_nothing_imports_upward():
    wrong = []
    for source, targets in import_graph().items():
        for target in targets:
            if room(source) != room(target) and floor(target) >= floor(source):
                wrong.append(f"{source} -> {target}")
    assert wrong == [], "imports upward or sideways (see LAYERS):\n" + "\n".join(wrong)


def test_no_import_cycle():
    graph = import_graph()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2
    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


def test_no_module_name_is_used_twice():
    seen = {}
    for name, path in modules().items():
        if path.name in ("__init__.py", "__main__.py"):
            continue
        seen.setdefault(path.stem, []).append(name)
    twice = {base: names for base, names in seen.items() if len(names) > 1}
    assert twice == {}


def test_each_folder_says_what_it_holds_and_what_it_never_does():
    for name, path in modules().items():
        if path.name != "__init__.py":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc, f"{path.relative_to(ROOT)}: no docstring"
        assert SAYS_NEVER.search(doc), f"{path.relative_to(ROOT)}: its docstring says nothing it never does"


def test_folders_stay_small_and_the_top_holds_a_handful():
    counts = {}
    for name, path in modules().items():
        if path.name not in ("__init__.py", "__main__.py"):
            counts.setdefault(os.path.dirname(path.relative_to(ROOT)), []).append(path.stem)
    top = counts.pop("pfrest", [])
    assert len(top) <= MAX_TOP, f"pfrest/ holds {len(top)} modules: {sorted(top)}"
    big = {folder: len(names) for folder, names in counts.items() if len(names) > MAX_MODULES}
    assert big == {}, f"folders over {MAX_MODULES} modules"


def test_a_long_module_says_why():
    long = []
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        lines, rel = text.count("\n"), path.relative_to(ROOT).as_posix()
        if lines > MAX_LINES and not SAYS_WHY.search(ast.get_docstring(ast.parse(text)) or ""):
            long.append(f"{rel}: {lines} lines")
    assert long == [], f"over {MAX_LINES} lines without saying why at the top:\n" + "\n".join(long)
