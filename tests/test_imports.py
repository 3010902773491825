"""The repository's modules import each other without a cycle, counting imports inside functions."""
import ast

from conftest import ROOT

FOLDERS = ("", "evals", "tools", "data", "benchmarks")


def our_modules():
    """{module name: path} of every Python file of the repository outside tests/."""
    modules = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).glob("*.py")):
            name = path.stem if not folder else f"{folder}.{path.stem}"
            modules[name] = path
    return modules


def imports(path, modules):
    """The modules of ours that a file imports, anywhere in it. Files in data/ and benchmarks/ put the
    repository root on sys.path, so a bare name is a top-level module of ours."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def test_no_import_cycles():
    modules = our_modules()
    graph = {name: imports(path, modules) - {name} for name, path in modules.items()}
    assert {"train_gpt", "kernels", "sampling", "evals.hellaswag", "tools.preflight"} <= graph.keys()
    assert "evals.hellaswag" in graph["train_gpt"]  # the edge that used to close a cycle, still there

    def cycle_from(start, path):
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return path + [nxt]
            if nxt not in path:
                found = cycle_from(start, path + [nxt])
                if found:
                    return found
        return None
    for name in graph:
        assert cycle_from(name, [name]) is None, " -> ".join(cycle_from(name, [name]))
