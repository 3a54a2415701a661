"""Which source files a step's result depends on, derived from the imports of the function that runs it.

A step's cache key (biflow/pipeline/cache.py) holds a fingerprint of the code that computes its result:
editing that code reruns the step and everything downstream, editing anything else does not. The files
are found by reading the sources with `ast` (nothing is imported), by this rule:

1. The entry is the file that defines the step's run function; it is hashed whole, but inside it only
   what the function needs is followed: the imports in its body (this codebase imports lazily), the
   module-level imports whose names it uses (annotations included: their classes' methods are what it
   calls on its arguments), and the module-level functions, classes and assignments it uses, each read
   the same way. So `run_train_forward` reaches `_stage_job` and `_train` and their imports, and not the
   evaluation code that biflow/pipeline/steps.py imports at its top for other steps.
2. Every other module of the package reached counts whole: all its imports, at the top and inside
   functions, are followed, transitively.
3. An import reaches the module a name is looked up in: `from biflow.data import load_split` reaches
   biflow/data/__init__.py, `from biflow.data import shards` and `from biflow.data.shards import y`
   reach biflow/data/shards.py only. Package __init__ files that merely run on the way are not followed
   (biflow/__init__.py imports the checkpoint code: every step would depend on the models).
4. Code that does not run on import, under `if TYPE_CHECKING:` or `if __name__ == "__main__":`, is
   skipped. Relative imports are resolved. Modules outside the package are ignored (the torch, ray or
   mlflow version is another concern).

Not seen: a module imported by a computed name (`importlib.import_module(f"...")`), and what the entry
file runs at import time for its side effects only. A step's `identity` is not followed: its value is in
the key already (StepDef.config), so its code changes the key only by changing that value.

The sets are computed once per process (`plan` asks on every call; a long-lived process does not see an
import added after its first plan, but the edited file is in the set, so the key changes all the same).
The files' contents are read on every call, through `source_digest`: tests replace it to simulate an edit.

    python -m biflow.pipeline.codeset [step ...]    prints each step's code set
"""
from __future__ import annotations

import ast
import functools
import hashlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # biflow/

_Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Assign | ast.AnnAssign | ast.AugAssign


def code_set(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The sources `fn`'s result depends on: sorted paths relative to the package's parent (biflow/...)."""
    return analyser(PACKAGE_ROOT).code_set(fn.__module__, fn.__qualname__)


def source_digest(rel: str) -> str:
    """The sha256 of one file of a code set (`rel` as `code_set` gives it)."""
    return hashlib.sha256((PACKAGE_ROOT.parent / rel).read_bytes()).hexdigest()


@functools.cache
def analyser(root: Path) -> Analyser:
    """The (per-process, caching) analyser of the package whose directory is `root`."""
    return Analyser(root)


class Analyser:
    """Code sets within one package, read from its directory `root` (the package is named after it)."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.package = self.root.name
        self._trees: dict[str, ast.Module] = {}
        self._sets: dict[tuple[str, str], tuple[str, ...]] = {}

    # ------------------------------------------------------------------ the rule
    def code_set(self, module: str, qualname: str) -> tuple[str, ...]:
        """The files the function `qualname` of `module` depends on (rule in the module docstring)."""
        if (module, qualname) not in self._sets:
            reached = self._closure(self._entry_needs(module, qualname))
            files = {self.file_of(m) for m in reached | {module}}
            self._sets[module, qualname] = tuple(sorted(f.relative_to(self.root.parent).as_posix() for f in files if f))
        return self._sets[module, qualname]

    def _entry_needs(self, module: str, qualname: str) -> set[str]:
        """The modules the function needs directly: imports in what it reaches in its own module (rule 1)."""
        tree = self._tree(module)
        imports: dict[str, set[str]] = {}
        definitions: dict[str, list[_Definition]] = {}
        for stmt in _top_level(tree.body):
            if isinstance(stmt, ast.Import | ast.ImportFrom):
                for name, mods in self._bindings(stmt, module).items():
                    imports.setdefault(name, set()).update(mods)
            elif isinstance(stmt, _Definition):
                for name in _defined_names(stmt):
                    definitions.setdefault(name, []).append(stmt)
        start = definitions.get(qualname.split(".")[0])
        if not start:  # not a module-level definition (a lambda, say): the whole module counts
            return self._imports_of(module)
        needs = set(imports.get("*", ()))
        todo, seen = list(start), set()
        while todo:
            node = todo.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            for sub in _walk(node):
                if isinstance(sub, ast.Import | ast.ImportFrom):
                    needs.update(*self._bindings(sub, module).values())
                elif isinstance(sub, ast.Name):
                    needs.update(imports.get(sub.id, ()))
                    todo.extend(definitions.get(sub.id, ()))
        return needs

    def _closure(self, modules: set[str]) -> set[str]:
        """`modules` (those in the package) and, transitively, every module of the package they import (rule 2)."""
        reached: set[str] = set()
        todo = [m for m in modules if self.file_of(m)]
        while todo:
            module = todo.pop()
            if module not in reached:
                reached.add(module)
                todo.extend(self._imports_of(module))
        return reached

    def _imports_of(self, module: str) -> set[str]:
        """Every package module `module` imports, at its top or in functions (not in code that never runs on import)."""
        out: set[str] = set()
        for node in _walk(self._tree(module)):
            if isinstance(node, ast.Import | ast.ImportFrom):
                out.update(*self._bindings(node, module).values())
        return {m for m in out if self.file_of(m)}

    # ------------------------------------------------------------------- imports
    def _bindings(self, node: ast.Import | ast.ImportFrom, module: str) -> dict[str, set[str]]:
        """Each name an import binds -> the modules a use of it reaches (rule 3); '*' for a star import."""
        out: dict[str, set[str]] = {}
        if isinstance(node, ast.Import):  # `import a.b.c` binds a, `import a.b.c as z` binds z: both reach a.b.c
            for a in node.names:
                out.setdefault(a.asname or a.name.split(".")[0], set()).add(a.name)
            return out
        base = node.module or ""
        if node.level:  # relative: from the module's package, one level up per extra dot
            package = module if self._is_package(module) else module.rpartition(".")[0]
            parts = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
        for a in node.names:  # a submodule, else a name of the package or module `base`
            sub = f"{base}.{a.name}"
            out.setdefault(a.asname or a.name, set()).add(sub if self.file_of(sub) else base)
        return out

    def file_of(self, module: str) -> Path | None:
        """The source file of a package module (its __init__.py for a package), None outside the package."""
        head, *rest = module.split(".")
        if head != self.package:
            return None
        base = self.root.joinpath(*rest)
        for candidate in (base / "__init__.py", base.with_name(base.name + ".py") if rest else None):
            if candidate is not None and candidate.is_file():
                return candidate
        return None

    def _is_package(self, module: str) -> bool:
        path = self.file_of(module)
        return path is not None and path.name == "__init__.py"

    def _tree(self, module: str) -> ast.Module:
        if module not in self._trees:
            path = self.file_of(module)
            if path is None:
                raise ValueError(f"{module} is not a module of {self.package} ({self.root})")
            self._trees[module] = ast.parse(path.read_bytes(), str(path))
        return self._trees[module]


def _never_runs(test: ast.expr) -> bool:
    """Whether an `if` with this test skips its body when the module is imported: TYPE_CHECKING, __name__ == "__main__"."""
    if isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__":
        return [type(op) for op in test.ops] == [ast.Eq] and [getattr(c, "value", None) for c in test.comparators] == ["__main__"]
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """`ast.walk` without the bodies of `if` blocks that never run on import (their `else:` runs, so it stays)."""
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _never_runs(child.test):
            for stmt in child.orelse:
                yield from _walk(stmt)
        else:
            yield from _walk(child)


def _top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """A module's statements, looking into top-level if/try/with blocks (but not into those `_never_runs`)."""
    for stmt in body:
        if isinstance(stmt, ast.If):
            yield from _top_level(stmt.orelse if _never_runs(stmt.test) else stmt.body + stmt.orelse)
        elif isinstance(stmt, ast.Try):
            yield from _top_level(stmt.body + [s for h in stmt.handlers for s in h.body] + stmt.orelse + stmt.finalbody)
        elif isinstance(stmt, ast.With):
            yield from _top_level(stmt.body)
        else:
            yield stmt


def _defined_names(stmt: _Definition) -> list[str]:
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return [stmt.name]
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


if __name__ == "__main__":  # not on import: the steps' code sets do not depend on this listing
    from biflow.pipeline.steps import STEPS

    for step in sys.argv[1:] or STEPS:
        print(f"{step}:", *code_set(STEPS[step].run), sep="\n  ")
