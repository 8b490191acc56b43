"""Files a user hands us are never unpickled freely: every `torch.load` in the package and tools passes
`weights_only=True`, every `Trainer.fit(ckpt_path=...)` too, no `allow_pickle=True`, and the only pickle readers are
`Unpickler` subclasses that restrict `find_class`. Checked on the syntax tree, so aliases and line breaks count."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(REPO / "dtrain").rglob("*.py"), *(REPO / "tools").rglob("*.py")])


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_loads(source: str, where: str = "<src>") -> list[str]:
    """Every place in ``source`` that could unpickle an untrusted file."""
    tree, bad = ast.parse(source), []
    torch_names = {"torch"} | {a.asname for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
                               if a.name == "torch" and a.asname}
    for node in ast.walk(tree):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            bad += [f"{line}: 'from {node.module} import load' hides torch.load" for a in node.names
                    if a.name == "load"]
        if isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith("Unpickler") for b in node.bases):
            if not any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                bad.append(f"{line}: Unpickler subclass {node.name} without a restricting find_class")
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        if func.endswith("torch.load") or func in {f"{t}.load" for t in torch_names}:
            if not _is_true(_kw(node, "weights_only")):
                bad.append(f"{line}: {func}(...) without weights_only=True")
        elif func.split(".")[-1] in ("load", "loads") and func.split(".")[0] in ("pickle", "dill", "cloudpickle"):
            bad.append(f"{line}: {func}(...) unpickles freely")
        elif func.split(".")[-1] == "fit" and _kw(node, "ckpt_path") is not None:
            if not _is_true(_kw(node, "weights_only")):
                bad.append(f"{line}: {func}(ckpt_path=...) without weights_only=True")
        if _is_true(_kw(node, "allow_pickle")):
            bad.append(f"{line}: allow_pickle=True")
    return bad


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load(p)",
    "import torch\ntorch.load(p, weights_only=False)",
    "import torch as T\nT.load(\n  p,\n  map_location='cpu')",
    "from torch import load",
    "import pickle\npickle.load(f)",
    "import numpy as np\nnp.load(p, allow_pickle=True)",
    "trainer.fit(m, ckpt_path=p)",
    "import pickle\nclass U(pickle.Unpickler):\n    pass",
])
def test_the_checker_catches_unsafe_loads(snippet):
    assert unsafe_loads(snippet), snippet


def test_the_checker_accepts_safe_loads():
    assert not unsafe_loads("import torch\ntorch.load(p, map_location='cpu', weights_only=True, mmap=True)\n"
                            "trainer.fit(m, ckpt_path=p, weights_only=True)\n"
                            "import pickle\nclass U(pickle.Unpickler):\n    def find_class(self, m, n): ...\n")


def test_package_and_tools_load_only_weights():
    assert len(SOURCES) > 20
    bad = [b for p in SOURCES for b in unsafe_loads(p.read_text(), str(p.relative_to(REPO)))]
    assert not bad, "\n".join(bad)
