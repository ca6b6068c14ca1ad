"""The layout: the pgdr package never imports Prefect; flows/ holds flows, tasks/ tasks."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                 for p in (ROOT / "pgdr").rglob("*.py"))
# The library may load none of these: Prefect (the WAL commands must start fast), nor the
# Prefect layers above it.
REFUSED = ("prefect", "flows", "tasks", "deployments")
GUARD = (
    "import sys\n"
    "class Refuse:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    f"        if name.split('.')[0] in {REFUSED!r}:\n"
    "            raise ImportError(f'the library imports {name}')\n"
    "sys.meta_path.insert(0, Refuse())\n"
)


def test_the_guard_refuses_prefect():
    done = subprocess.run([sys.executable, "-c", GUARD + "import prefect\n"], cwd=ROOT,
                          capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 1 and "the library imports prefect" in done.stderr


@pytest.mark.parametrize("module", LIBRARY)
def test_a_library_module_imports_without_prefect(module):
    done = subprocess.run([sys.executable, "-c", GUARD + f"import {module}\n"], cwd=ROOT,
                          capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1:]


def test_the_wal_commands_load_a_light_closure():
    probe = ("import sys, pgdr.pitr.wal\n"
             "heavy = ('prefect', 'boto3', 'psycopg', 'great_expectations', 'rich', 'flows', 'tasks')\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                          check=True, timeout=120)
    assert done.stdout.strip() == "[]"


def _modules(*folders):
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def _decorated(node, name):
    for decorator in getattr(node, "decorator_list", []):
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if getattr(target, "id", None) == name or getattr(target, "attr", None) == name:
            return True
    return False


def _name(path):
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", _modules("pgdr", "tasks", "flows"), ids=_name)
def test_every_module_says_what_it_is_for(path):
    assert ast.get_docstring(ast.parse(path.read_text())), f"{_name(path)} has no docstring"


@pytest.mark.parametrize("path", _modules("flows"), ids=_name)
def test_flows_define_no_tasks(path):
    tree = ast.parse(path.read_text())
    assert not [node.name for node in tree.body if _decorated(node, "task")]


@pytest.mark.parametrize("path", _modules("tasks", "pgdr"), ids=_name)
def test_tasks_and_the_library_do_not_import_flows(path):
    imported = [node.module if isinstance(node, ast.ImportFrom) else alias.name
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0)
                for alias in node.names]
    assert not [m for m in imported if m and m.split(".")[0] == "flows"]
