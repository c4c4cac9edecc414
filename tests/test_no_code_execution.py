"""No pickle, marshal, eval or exec anywhere in fedstack's source."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fedstack"
BANNED_MODULES = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
BANNED_CALLS = {"eval", "exec", "compile", "__import__"}


def test_source_has_no_code_executing_deserialisation() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    problems = []
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id in BANNED_CALLS:
                    problems.append(f"{path}:{node.lineno}: {node.func.id}()")
                continue
            elif (
                isinstance(node, ast.Attribute)
                and node.attr in ("loads", "load")
                and isinstance(node.value, ast.Name)
                and node.value.id in BANNED_MODULES
            ):
                problems.append(f"{path}:{node.lineno}: {node.value.id}.{node.attr}")
                continue
            else:
                continue
            problems += [f"{path}:{node.lineno}: import {n}" for n in names if n in BANNED_MODULES]
        text = path.read_text()
        if "allow_pickle=True" in text:
            problems.append(f"{path}: allow_pickle=True")
    assert not problems, problems
