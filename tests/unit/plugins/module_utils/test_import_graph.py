"""The import graph of the core (plugins/module_utils), read from the sources with ``ast``.

No cycle; no room imports Ansible; no module in plugins/modules reaches a ``cli*`` room (the host
tool's rooms are not shipped to managed hosts by AnsiballZ); no room over 700 lines; and the
picture in docs/architecture.md ("Who imports whom") is the graph of the code.
"""
from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
MODULE_UTILS = os.path.join(ROOT, "plugins", "module_utils")
MODULES = os.path.join(ROOT, "plugins", "modules")
ARCHITECTURE = os.path.join(ROOT, "docs", "architecture.md")
PACKAGE = "ansible_collections.baileys.resilience.plugins.module_utils"
MAX_LINES = 700
# drawn nowhere: every room that defines an exception class imports it
NOT_DRAWN = {"errors"}


def _rooms():
    return sorted(n[:-3] for n in os.listdir(MODULE_UTILS) if n.endswith(".py") and n != "__init__.py")


def _parse(path):
    with open(path, encoding="utf-8") as fh:
        return ast.parse(fh.read(), path)


def _imports(tree):
    """``(rooms, foreign)``: the module_utils rooms a file imports (anywhere, lazily too) and the other
    top-level packages it imports."""
    rooms, foreign = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    rooms.add(alias.name[len(PACKAGE) + 1:].split(".")[0])
                else:
                    foreign.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1:  # relative: a sibling room
                if module:
                    rooms.add(module.split(".")[0])
                else:
                    rooms.update(alias.name for alias in node.names)
            elif node.level:
                raise AssertionError("import from beyond module_utils: %s" % ast.dump(node))
            elif module == PACKAGE:
                rooms.update(alias.name for alias in node.names)
            elif module.startswith(PACKAGE + "."):
                rooms.add(module[len(PACKAGE) + 1:].split(".")[0])
            else:
                foreign.add(module.split(".")[0])
    return rooms, foreign


@pytest.fixture(scope="module")
def graph():
    out = {}
    for room in _rooms():
        rooms, foreign = _imports(_parse(os.path.join(MODULE_UTILS, room + ".py")))
        out[room] = (rooms, foreign)
    return out


def _closure(graph, start):
    seen, todo = set(), list(start)
    while todo:
        room = todo.pop()
        if room not in seen:
            seen.add(room)
            todo.extend(graph[room][0])
    return seen


def test_every_import_names_a_room(graph):
    for room, (rooms, _foreign) in graph.items():
        assert rooms <= set(graph), "%s imports %s, which is not in module_utils" % (room, rooms - set(graph))


def test_no_cycle(graph):
    state = {}  # room -> "open" while on the path, "done" after

    def visit(room, path):
        if state.get(room) == "done":
            return
        if state.get(room) == "open":
            raise AssertionError("import cycle: %s" % " -> ".join(path[path.index(room):] + [room]))
        state[room] = "open"
        for dep in sorted(graph[room][0]):
            visit(dep, path + [room])
        state[room] = "done"

    for room in graph:
        visit(room, [])


def test_no_room_imports_ansible(graph):
    for room, (_rooms, foreign) in graph.items():
        assert "ansible" not in foreign, "%s imports ansible: the core must run without it (the host tool)" % room


def test_no_module_reaches_the_host_tool_rooms(graph):
    modules = sorted(n for n in os.listdir(MODULES) if n.endswith(".py") and n != "__init__.py")
    assert modules
    for name in modules:
        rooms, _foreign = _imports(_parse(os.path.join(MODULES, name)))
        assert rooms, "%s imports no room of module_utils" % name
        reached = _closure(graph, rooms)
        assert not {r for r in reached if r.startswith("cli")}, "%s reaches %s" % (
            name, sorted(r for r in reached if r.startswith("cli")))


def test_no_room_is_over_the_line_limit():
    for room in _rooms():
        with open(os.path.join(MODULE_UTILS, room + ".py"), encoding="utf-8") as fh:
            lines = sum(1 for _line in fh)
        assert lines <= MAX_LINES, "%s.py has %d lines (limit %d): split it by what it does" % (room, lines, MAX_LINES)


def _strip_notes(text):
    return re.sub(r"\([^)]*\)", "", text)


def _documented_graph():
    """The picture under "Who imports whom": ``left, left -> right, right`` per line; ``(...)`` are notes."""
    with open(ARCHITECTURE, encoding="utf-8") as fh:
        text = fh.read()
    m = re.search(r"Who imports whom.*?```\n(.*?)```", text, re.S)
    assert m, "docs/architecture.md has no 'Who imports whom' picture"
    documented = {}
    for line in m.group(1).splitlines():
        if not line.strip():
            continue
        left, _arrow, right = line.partition("->")
        assert _arrow, "not 'rooms -> rooms': %r" % line
        deps = set() if right.strip() == "nothing of ours" else {
            d.strip() for d in _strip_notes(right).split(",") if d.strip()}
        for room in _strip_notes(left).split(","):
            room = room.strip()
            assert room not in documented, "%s is drawn twice" % room
            documented[room] = deps
    return documented


def test_architecture_picture_is_the_code(graph):
    documented = _documented_graph()
    drawn = set(graph) - NOT_DRAWN
    assert set(documented) == drawn, "rooms missing from the picture: %s; drawn but absent: %s" % (
        sorted(drawn - set(documented)), sorted(set(documented) - drawn))
    for room in sorted(drawn):
        actual = graph[room][0] - NOT_DRAWN
        assert documented[room] == actual, "%s: the picture says %s, the code imports %s" % (
            room, sorted(documented[room]), sorted(actual))
