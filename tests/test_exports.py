"""No exported name is defined in two modules: a generic piece lives once (in 00-04) and paper modules import it.

A module *defines* a name when the object was made there: for a function or class, its `__module__`; for anything else (a constant,
a table, a preset instance), a top-level assignment of the name in the module's source. `from .core import *` and `x = other.x`
re-export, they do not define."""
import ast, importlib, inspect, pkgutil
from collections import defaultdict
from pathlib import Path
import pytest
import longctx_nb

MODULES = sorted(m.name for m in pkgutil.iter_modules(longctx_nb.__path__) if not m.name.startswith("_"))


def _assigned_names(path: Path) -> set:
    "Names bound at the top level of a module's source by def, class or assignment (imports excluded)."
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                for n in ast.walk(t):
                    if isinstance(n, ast.Name): names.add(n.id)
    return names


def defining_module(mod, name: str) -> str | None:
    "Where `mod.name` was defined: `__module__` for functions and classes, else `mod` itself if its source assigns the name."
    obj = getattr(mod, name)
    if inspect.isclass(obj) or inspect.isroutine(obj):
        where = getattr(obj, "__module__", None)
        if where == mod.__name__ or (where or "").startswith("longctx_nb."): return where
    if name in _assigned_names(Path(mod.__file__)):
        # an assignment that only aliases a function or class made elsewhere (x = other.x) is not a definition here
        if (inspect.isclass(obj) or inspect.isroutine(obj)) and getattr(obj, "__module__", None) != mod.__name__: return obj.__module__
        return mod.__name__
    return None


@pytest.fixture(scope="module")
def modules():
    return {m: importlib.import_module(f"longctx_nb.{m}") for m in MODULES}


def test_every_module_imports_and_lists_what_it_exports(modules):
    missing = {m: [n for n in getattr(mod, "__all__", []) if not hasattr(mod, n)] for m, mod in modules.items()}
    assert not any(missing.values()), f"names in __all__ that the module lacks: { {m: v for m, v in missing.items() if v} }"
    assert all(hasattr(mod, "__all__") for mod in modules.values())


def test_no_exported_name_is_defined_in_two_modules(modules):
    homes = defaultdict(set)
    for m, mod in modules.items():
        for name in mod.__all__:
            where = defining_module(mod, name)
            if where == mod.__name__: homes[name].add(m)
    twice = {n: sorted(ms) for n, ms in homes.items() if len(ms) > 1}
    assert not twice, "exported names defined in more than one module (keep one home, import it elsewhere): " + \
        "; ".join(f"{n}: {', '.join(ms)}" for n, ms in sorted(twice.items()))


def test_the_checker_tells_a_definition_from_a_re_export(modules):
    core, models = modules["core"], modules.get("models")
    assert defining_module(core, "save_report") == "longctx_nb.core" and defining_module(core, "CONFIGS") == "longctx_nb.core"
    if models is not None and hasattr(models, "save_report"):
        assert defining_module(models, "save_report") == "longctx_nb.core"     # arrived by `from .core import *`
