"""The kernel packages stand alone: `jaxinfer.ops` is the one place where they meet the engine."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def imported_packages(package: str) -> set[str]:
    """Top-level names of every module imported anywhere in `package`'s Python files."""
    names = set()
    for path in (ROOT / package).glob("**/*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package, others", [("kernels_pallas", {"jaxinfer", "kernels_cpu"}),
                                             ("kernels_cpu", {"jaxinfer", "kernels_pallas"})])
def test_kernel_package_imports_neither_the_engine_nor_the_other_kernels(package, others):
    assert imported_packages(package) & others == set()

