"""A step's code version covers the sources its run function imports, derived from the code (biflow/pipeline/codeset.py).

The first tests read the real steps of pipelines/digits.yaml; an edit is simulated by giving one file
another digest. The last ones check the analyser alone on a toy package written to tmp_path.
"""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from biflow.pipeline import codeset
from biflow.pipeline.cache import Storage
from biflow.pipeline.codeset import Analyser, code_set
from biflow.pipeline.runner import plan
from biflow.pipeline.spec import load_pipeline
from biflow.pipeline.steps import STEPS

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "pipelines" / "digits.yaml"


def source_of(obj: object) -> str:
    """The repository-relative source file of a module or of the module defining `obj`, as code sets name files."""
    module = obj if isinstance(obj, ModuleType) else sys.modules[obj.__module__]
    return Path(module.__file__).resolve().relative_to(ROOT).as_posix()


def keys(tmp_path: Path) -> dict[str, str]:
    cfg = load_pipeline(DIGITS, [f"pipeline.storage={tmp_path}"])
    return {p.name: p.key for p in plan(cfg, Storage(str(tmp_path)))}


def edited(monkeypatch: pytest.MonkeyPatch, rel: str) -> None:
    """From now on `rel` reads as if someone had changed it."""
    digest = codeset.source_digest
    monkeypatch.setattr(codeset, "source_digest", lambda path: "edited" if path == rel else digest(path))


# ------------------------------------------------------------------ the real steps
def test_train_forward_covers_its_step_module_the_context_the_forward_flow_and_the_training_loop():
    from biflow.models.forward_flow import ForwardFlow
    from biflow.pipeline import context, raytrain, steps
    from biflow.training.loop import fit

    files = set(code_set(STEPS["train_forward"].run))
    assert {source_of(steps), source_of(context), source_of(raytrain), source_of(ForwardFlow), source_of(fit)} <= files


def test_train_forward_does_not_cover_the_evaluation_code_it_never_imports():
    from biflow.pipeline import evaluation

    files = code_set(STEPS["train_forward"].run)
    assert source_of(evaluation) not in files
    assert not [f for f in files if f.startswith(("biflow/metrics/", "biflow/sampling/", "biflow/commands/"))]


def test_evaluate_covers_the_metrics_and_the_samplers():
    from biflow.metrics.frechet import frechet_distance
    from biflow.pipeline import evaluation
    from biflow.sampling import onenfe

    files = code_set(STEPS["evaluate"].run)
    assert {source_of(evaluation), source_of(frechet_distance), source_of(onenfe)} <= set(files)


def test_every_file_of_a_code_set_exists_and_the_sets_are_sorted():
    for step in STEPS.values():
        files = code_set(step.run)
        assert list(files) == sorted(files) and all((ROOT / f).is_file() for f in files), step.name


def test_editing_a_module_train_forward_imports_reruns_it_and_everything_downstream_but_not_prepare(tmp_path, monkeypatch):
    from biflow.training.forward import evaluate_bpd  # imported by run_train_forward itself

    rel = source_of(evaluate_bpd)
    assert rel in code_set(STEPS["train_forward"].run) and rel not in code_set(STEPS["prepare"].run)
    before = keys(tmp_path)
    edited(monkeypatch, rel)
    after = keys(tmp_path)
    assert {name for name in before if before[name] != after[name]} == {"train_forward", "train_reverse", "evaluate", "report"}


@pytest.mark.parametrize(("module", "rerun"), [
    ("steps", {"prepare", "train_forward", "train_reverse", "evaluate", "report"}),  # where run_prepare, run_train_* live
    ("context", {"prepare", "train_forward", "train_reverse", "evaluate", "report"}),  # what every step function receives
    ("evaluation", {"evaluate", "report"}),  # where run_evaluate and run_report live
])
def test_editing_the_module_of_a_step_function_reruns_that_step_and_what_follows(tmp_path, monkeypatch, module, rerun):
    before = keys(tmp_path)
    edited(monkeypatch, f"biflow/pipeline/{module}.py")
    after = keys(tmp_path)
    assert {name for name in before if before[name] != after[name]} == rerun


def test_editing_a_module_only_evaluate_imports_leaves_the_training_steps_alone(tmp_path, monkeypatch):
    from biflow.metrics.frechet import frechet_distance

    rel = source_of(frechet_distance)
    assert rel in code_set(STEPS["evaluate"].run) and rel not in code_set(STEPS["train_forward"].run)
    before = keys(tmp_path)
    edited(monkeypatch, rel)
    after = keys(tmp_path)
    assert {name for name in before if before[name] != after[name]} == {"evaluate", "report"}


# --------------------------------------------------------------- the analyser alone
TOY = {
    "__init__.py": "from toy.heavy import everything\n",
    "heavy.py": "everything = 1\n",
    "entry.py": """
        from __future__ import annotations

        import os
        from typing import TYPE_CHECKING

        import toy.aliased.mod as am
        from toy.helpers import helper_value
        from toy.unused_top import nothing
        from . import relative_sibling

        if TYPE_CHECKING:
            from toy.typing_only import Context


        def _helper():
            return helper_value


        def other_step():
            from toy.other import x
            return x


        def run(ctx: Context):
            from toy.lazy import thing
            from toy.pkg import value
            from toy.pkg2 import sub
            return os.getpid(), _helper(), am.f(), relative_sibling.g(), thing(), value, sub
        """,
    "helpers.py": "helper_value = 1\n",
    "unused_top.py": "nothing = None\n",
    "other.py": "x = 1\n",
    "typing_only.py": "Context = object\n",
    "relative_sibling.py": "def g():\n    return 1\n",
    "aliased/__init__.py": "import toy.heavy\n",
    "aliased/mod.py": "def f():\n    return 1\n",
    "lazy.py": """
        import numpy
        from toy.lazy_top import unused


        def thing():
            from .deep import z
            return z


        if __name__ == "__main__":
            from toy.script_only import main
        """,
    "lazy_top.py": "unused = None\n",
    "script_only.py": "main = None\n",
    "deep.py": "from .deeper import w as z\n",
    "deeper.py": "w = 1\n",
    "pkg/__init__.py": "value = 1\n",
    "pkg/sub.py": "",
    "pkg2/__init__.py": "import toy.heavy\n",
    "pkg2/sub.py": "",
}


@pytest.fixture
def toy(tmp_path: Path) -> set[str]:
    """The code set of toy.entry.run, in a toy package written to tmp_path."""
    for rel, text in TOY.items():
        path = tmp_path / "toy" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    files = Analyser(tmp_path / "toy").code_set("toy.entry", "run")
    return {f.removeprefix("toy/") for f in files}


def test_the_run_functions_own_file_counts(toy):
    assert "entry.py" in toy


def test_lazy_imports_count_in_the_run_function_and_in_every_module_it_reaches(toy):
    assert {"lazy.py", "deep.py", "deeper.py"} <= toy


def test_a_reached_module_counts_whole_with_all_its_imports(toy):
    assert "lazy_top.py" in toy  # lazy.py imports it at its top for no one in particular


def test_from_package_import_reaches_the_package_init_for_a_name_and_only_the_submodule_for_a_submodule(toy):
    assert "pkg/__init__.py" in toy and "pkg/sub.py" not in toy  # from toy.pkg import value
    assert "pkg2/sub.py" in toy and "pkg2/__init__.py" not in toy  # from toy.pkg2 import sub


def test_relative_and_aliased_imports_are_resolved(toy):
    assert {"relative_sibling.py", "aliased/mod.py"} <= toy


def test_in_its_own_module_only_what_the_run_function_uses_counts(toy):
    assert "helpers.py" in toy  # through the module-level helper it calls
    assert "unused_top.py" not in toy and "other.py" not in toy  # imported at the top, or by another function


def test_code_that_never_runs_on_import_and_packages_merely_passed_through_do_not_count(toy):
    assert "typing_only.py" not in toy and "script_only.py" not in toy  # if TYPE_CHECKING:, if __name__ == "__main__":
    assert "__init__.py" not in toy and "aliased/__init__.py" not in toy and "heavy.py" not in toy


def test_the_code_set_is_exactly_that(toy):
    assert toy == {"entry.py", "helpers.py", "relative_sibling.py", "aliased/mod.py", "lazy.py", "lazy_top.py", "deep.py",
                   "deeper.py", "pkg/__init__.py", "pkg2/sub.py"}
