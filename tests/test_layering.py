"""The ZO core depends on torch alone; backends and data libraries stay out of it."""

import ast
import pathlib
import subprocess
import sys

CORE = pathlib.Path(__file__).parent.parent / "zo_scale" / "core"
FORBIDDEN = {"deepspeed", "accelerate", "bitsandbytes", "peft", "datasets", "transformers"}


def test_core_modules_import_no_backend_or_data_library():
    for path in CORE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
                assert not name.startswith(("zo_scale.train", "zo_scale.models", "zo_scale.tasks")), path.name


def test_importing_the_package_loads_no_backend():
    code = f"import sys, zo_scale; print(sorted(m for m in {sorted(FORBIDDEN)!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
