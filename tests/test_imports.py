"""The package's import graph, read with `ast`: no cycles (module-level or inside functions), and a lazy top level."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import loramix

PACKAGE_DIR = os.path.dirname(loramix.__file__)


def _module_name(path: str) -> str:
    parts = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-3].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _lazy_names(init_tree: ast.Module) -> dict[str, str]:
    """The package's `_LAZY` table: public name -> defining module."""
    for node in init_tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            return {k: f"loramix.{v}" for k, v in ast.literal_eval(node.value).items()}
    return {}


def import_graph() -> dict[str, set[str]]:
    """module -> the loramix modules it imports anywhere in its file (TYPE_CHECKING blocks left out)."""
    files = {}
    for folder, _, names in os.walk(PACKAGE_DIR):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                files[_module_name(path)] = (path, ast.parse(open(path, encoding="utf-8").read()))
    lazy = _lazy_names(files["loramix"][1])
    graph: dict[str, set[str]] = {}
    for module, (path, tree) in files.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING") for n in ast.walk(node)}
        edges = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("loramix")}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{base}.{node.module}" if node.module else base
                elif node.module and node.module.startswith("loramix"):
                    base = node.module
                else:
                    continue
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    if target in files:
                        edges.add(target)
                    elif base == "loramix" and alias.name in lazy:
                        edges.add(lazy[alias.name])
                    else:
                        edges.add(base)
        graph[module] = {e for e in edges if e in files and e != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def test_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_loading_is_used_by_its_callers():
    graph = import_graph()
    for user in ("loramix.model", "loramix.serving.app", "loramix.training.loop", "loramix.demo.pipeline", "loramix.cli"):
        assert "loramix.loading" in graph[user] or "loramix.model" in graph[user], user
    assert "loramix.cli" not in graph["loramix.serving.app"]  # the old cli <-> server cycle


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_only_the_cli_exits():
    """Library code raises exceptions; cli.py alone turns them into exit codes."""
    offenders = []
    for folder, _, names in os.walk(PACKAGE_DIR):
        for name in names:
            path = os.path.join(folder, name)
            if not name.endswith(".py") or path == os.path.join(PACKAGE_DIR, "cli.py"):
                continue
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                text = ast.unparse(node) if isinstance(node, (ast.Raise, ast.Call)) else ""
                if "SystemExit" in text or text.startswith(("sys.exit(", "exit(", "os._exit(", "quit(")):
                    offenders.append(f"{os.path.relpath(path, PACKAGE_DIR)}:{node.lineno}: {text[:60]}")
    assert offenders == []


def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_and_help_load_no_torch():
    heavy = "sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)"
    assert _run(f"import sys, loramix; print({heavy})") == "[]"
    out = _run("import sys, contextlib, io\nfrom loramix.cli import main\n"
               "with contextlib.redirect_stdout(io.StringIO()) as help_text:\n    code = main(['--help'])\n"
               f"print(code, 'train' in help_text.getvalue(), {heavy})")
    assert out == "0 True []"
    # a usage error is reported before anything heavy is imported
    out = _run("import sys, contextlib, io\nfrom loramix.cli import main\n"
               "with contextlib.redirect_stderr(io.StringIO()):\n"
               "    code = main(['generate', '--model', 'm', '--prompt', ''])\n"
               f"print(code, {heavy})")
    assert out == "2 []"


def test_public_names_still_import():
    out = _run("from loramix import XLoraConfig, XLoraModel, train_xlora; import loramix\n"
               "print(XLoraModel.__module__, XLoraConfig.__module__, train_xlora.__module__, 'XLoraModel' in dir(loramix))")
    assert out == "loramix.model loramix.config loramix.training.loop True"


# The layers of the house, lowest first: a module imports only modules of its own layer or below (imports inside
# functions count too). The engine sits below the model: it drives any model-like object and imports none of the
# method's modules but the config, so `XLoraModel.generate` delegating to it points down.
LAYERS = [
    ["_version", "checks", "files", "hub", "cards", "memory", "tiny", "losses", "classifier", "engine.text", "demo.domains"],
    ["config", "backbone", "experts"],
    ["engine"],
    ["layers", "loading", "checkpoint", "interop.mistralrs", "interop.saving"],
    ["model"],
    ["training", "interop.export", "analysis", "evaluation", "science"],
    ["serving"],
    ["demo", "cli", "warnings_policy", "recipe"],
]


def layer_of(module: str) -> int:
    """The layer of a loramix module: its own entry, else its subpackage's (the longest matching prefix)."""
    name = module.removeprefix("loramix").removeprefix(".")
    best = None
    for rank, names in enumerate(LAYERS):
        for entry in names:
            if (name == entry or name.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (rank, entry)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def test_every_import_points_down_the_layers():
    graph = import_graph()
    upward = [f"{m} (layer {layer_of(m)}) -> {t} (layer {layer_of(t)})"
              for m, targets in graph.items() if m != "loramix" for t in targets if layer_of(t) > layer_of(m)]
    assert upward == []


def test_the_layer_check_sees_an_upward_import():
    assert layer_of("loramix.model") > layer_of("loramix.layers")
    assert layer_of("loramix.serving.app") > layer_of("loramix.engine.batch") > layer_of("loramix.config")
    assert layer_of("loramix.engine.text") < layer_of("loramix.engine.rows")  # the longest prefix wins
