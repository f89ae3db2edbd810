"""The layout's rules, checked on the source: no module imports a module
that imports it back (function-level imports included), and record bytes
are parsed in record.py alone."""

import ast
import pathlib

import shoebox_worker

PACKAGE = pathlib.Path(shoebox_worker.__file__).parent


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path):
    """The project modules ``path`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("shoebox_worker"):
            for alias in node.names:
                full = "%s.%s" % (node.module, alias.name)
                module = PACKAGE.parent / full.replace(".", "/")
                found.add(full if module.with_suffix(".py").exists()
                          or module.is_dir() else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names
                         if alias.name.startswith("shoebox_worker"))
    return found


def test_no_module_imports_one_that_imports_it_back():
    graph = {_module_name(path): _imports(path)
             for path in PACKAGE.rglob("*.py")}
    assert len(graph) > 30

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for name in graph.get(todo.pop(), ()):
                if name not in seen:
                    seen.add(name)
                    todo.append(name)
        return seen

    cycles = sorted(name for name in graph
                    if name != "shoebox_worker" and name in reachable(name))
    assert cycles == []


#: Modules that use struct for something else than records: a socket
#: timeval (broker's receive timeout) and SO_PEERCRED (notify).
STRUCT_ELSEWHERE = {"broker.py", "notify.py"}
#: Modules with a byte format of their own, not records: the archive
#: index (docs/format.md, "Index files") and the period bundles ("Period
#: bundles").
OTHER_FORMATS = {"index.py", "period_bundle.py"}


def test_record_bytes_are_parsed_in_record_py_alone():
    """Others use record's functions; none unpacks record bytes itself."""
    for path in PACKAGE.rglob("*.py"):
        if path.name == "record.py" or path.name in OTHER_FORMATS:
            continue
        tree = ast.parse(path.read_text())
        names = {alias.name for node in ast.walk(tree)
                 if isinstance(node, (ast.Import, ast.ImportFrom))
                 for alias in node.names}
        if path.name not in STRUCT_ELSEWHERE:
            assert "struct" not in names, path
        source = path.read_text()
        for needle in ("MAGIC", "_V1_HEAD", "_V2_HEAD", "<ih"):
            assert needle not in source.replace("_MAGICS", ""), (path, needle)
