"""The code's shape: no import cycle, no function longer than 100 lines, the programs in one package (opendit.cli),
each only a parser and a main() ending through run_main; no argparse namespace in the library; sampling apart from
training and free of objective type tests; and ``python -m opendit`` working like the ``opendit`` command."""

import ast
import os
import subprocess
import sys

import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
PROGRAMS = ("train", "sample", "sample_ddp", "score_digits", "evaluate", "extract_features", "convert", "launch",
            "export", "serve")
PROGRAM_FUNCTIONS = {"build_parser", "main", "report"}  # report: what a program prints
MAX_FUNCTION_LINES = 100


def modules() -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(os.path.join(SRC, "opendit")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, SRC)[:-3].replace(os.sep, ".")
                out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def imports_of(name: str, path: str, known: dict) -> set[str]:
    """Modules of opendit that ``name`` imports (anywhere in the file, also inside functions), and the packages
    those imports initialise."""
    tree = ast.parse(open(path).read())
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for t in targets:
            parts = t.split(".")
            for i in range(2, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in known and prefix != name and not name.startswith(prefix + "."):
                    found.add(prefix)
    return found


def test_no_import_cycle():
    known = modules()
    graph = {m: imports_of(m, p, known) for m, p in known.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_function_is_longer_than_100_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long


@pytest.mark.parametrize("program", PROGRAMS)
def test_programs_are_a_parser_and_a_main_through_run_main(program):
    tree = ast.parse(open(os.path.join(SRC, "opendit", "cli", f"{program}.py")).read())
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert {"build_parser", "main"} <= functions and functions <= PROGRAM_FUNCTIONS, functions
    assert not [n for n in tree.body if isinstance(n, ast.ClassDef)]
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    calls = {c.func.id for c in ast.walk(main) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
    assert "run_main" in calls
    # and nothing else catches the error classes itself
    handlers = [h for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler)]
    assert not handlers, f"{program}.py handles exceptions itself"


def test_the_programs_are_the_cli_package_and_nothing_else_is_a_program():
    """Every module with a ``main`` is in opendit.cli (and opendit/__main__.py, which calls it)."""
    mains = sorted(name for name, path in modules().items()
                   if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(open(path).read()).body))
    assert mains and all(m == "opendit.cli" or m.startswith("opendit.cli.") for m in mains), mains
    assert {f"opendit.cli.{p}" for p in PROGRAMS} <= set(mains)


def test_train_dit_is_train_under_the_specs_second_name():
    scripts = os.path.join(os.path.dirname(SRC), "scripts", "dit")
    assert os.path.realpath(os.path.join(scripts, "train_dit.py")) == os.path.realpath(os.path.join(scripts, "train.py"))


def library_modules() -> dict[str, str]:
    return {n: p for n, p in modules().items() if not (n == "opendit.cli" or n.startswith("opendit.cli."))}


def test_the_library_takes_no_argparse_namespace():
    """Library code gets typed configs (opendit.config) or plain arguments: no parameter called ``args``, no
    ``getattr(args, ...)``, no Namespace and no parsing outside the programs (the one exception: reading a training
    checkpoint that pickled an argparse.Namespace, opendit.checkpoint). The flag checkers of opendit.errors raise
    argparse's error type, which is all the library takes from argparse."""
    found = []
    for name, path in library_modules().items():
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if any(a.arg == "args" for a in node.args.args + node.args.kwonlyargs):
                    found.append(f"{name}.{node.name}(args)")
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
                found.append(f"{name}: args.{node.attr}")
            if isinstance(node, ast.Attribute) and node.attr in ("Namespace", "parse_args", "parse_known_args") \
                    and name != "opendit.checkpoint":
                found.append(f"{name}: {ast.unparse(node)}")
            if isinstance(node, ast.Attribute) and node.attr == "ArgumentParser" and name != "opendit.errors":
                found.append(f"{name}: {ast.unparse(node)}")
    assert not found, found


def test_sampling_imports_nothing_from_training():
    known = modules()
    bad = {m: sorted(i for i in imports_of(m, p, known) if i.startswith("opendit.training"))
           for m, p in known.items() if m.startswith("opendit.sampling")}
    assert not any(bad.values()), bad


def test_sampling_holds_no_objective_type_tests():
    """Sampling asks the objective (opendit.objectives.Objective); it never tests which objective it has."""
    found = []
    for name, path in modules().items():
        if not name.startswith("opendit.sampling"):
            continue
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in ("Transport", "GaussianDiffusion", "FlowObjective",
                                                          "DiffusionObjective"):
                found.append(f"{name}: {node.id}")
            if isinstance(node, ast.Constant) and node.value in ("flow", "diffusion"):
                found.append(f"{name}: the string {node.value!r}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
                if "objective" in ast.unparse(node).lower():
                    found.append(f"{name}: {ast.unparse(node)}")
    assert not found, found


def test_python_dash_m_opendit_is_the_opendit_command(tmp_path, capsys):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "opendit", "models", "--image_size", "32", "--vae_downsample", "1",
                          "--in_channels", "3", "--num_classes", "10"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "DiT-XL/2" in out.stdout and "DiT-N/8" in out.stdout
    # the command's own errors end through run_main too: one line, exit code 2
    from opendit.cli import main

    assert main(["models", "--image_size", "30", "--vae_downsample", "8"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and err.startswith("error: --image_size 30 is not divisible")
