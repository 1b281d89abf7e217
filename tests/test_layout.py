"""The package layout shows the pipeline: each layer of ``jax_sae`` imports only the layers below
it, the exporter never imports JAX, and the code stands on its own (no outside document cited)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("util", "parallel", "data", "model", "report", "training")
"""Bottom to top; ``export`` sits apart and may import ``util`` only."""
ALLOWED = {layer: set(LAYERS[: i + 1]) for i, layer in enumerate(LAYERS)} | {
    "export": {"util", "export"}
}
ABOVE_ALL = ["features.py", "sae.py"]
"""Top-level modules above every layer (``jax_sae.SAE``): they may import any layer and export,
and no layer imports them (their names are in no ``ALLOWED`` set)."""


def imported_modules(file: Path) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.append(node.module)
        elif isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
    return modules


def package_files() -> list[tuple[str, Path]]:
    return [
        (file.relative_to(REPO / "jax_sae").parts[0], file)
        for file in sorted((REPO / "jax_sae").rglob("*.py"))
        if len(file.relative_to(REPO / "jax_sae").parts) > 1
    ]


def test_every_module_lives_in_a_layer():
    assert {layer for layer, _ in package_files()} == set(ALLOWED)
    top_level = sorted(p.name for p in (REPO / "jax_sae").glob("*.py"))
    assert top_level == ["__init__.py", *ABOVE_ALL]
    assert not {Path(name).stem for name in ABOVE_ALL} & set().union(*ALLOWED.values())


def test_the_package_and_the_exporter_import_without_jax():
    """``jax_sae/__init__.py`` imports ``jax_sae.SAE`` only on first use: the evaluation
    environment, which has no JAX, imports ``jax_sae.export`` and ``jax_sae.data``."""
    code = (
        "import sys, jax_sae, jax_sae.export.saelens, jax_sae.data.cache\n"
        "assert 'jax' not in sys.modules, 'jax imported'\n"
        "assert jax_sae.SAE.__module__ == 'jax_sae.sae' and 'jax' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_only_go_downwards(layer):
    upward = []
    for owner, file in package_files():
        if owner != layer:
            continue
        for module in imported_modules(file):
            parts = module.split(".")
            if parts[0] == "jax_sae" and len(parts) > 1 and parts[1] not in ALLOWED[layer]:
                upward.append(f"{file.relative_to(REPO)} imports {module}")
            if layer == "export" and parts[0] in ("jax", "flax", "optax", "orbax"):
                upward.append(f"{file.relative_to(REPO)} imports {module}")
    assert not upward, upward


def test_the_layer_check_catches_an_upward_import(tmp_path):
    file = tmp_path / "bad.py"
    file.write_text("from jax_sae.training.trainer import Trainer\nimport jax\n")
    assert imported_modules(file) == ["jax_sae.training.trainer", "jax"]
    assert "training" not in ALLOWED["model"] and "jax" not in ALLOWED["export"]


def test_no_code_cites_an_outside_document():
    """A clone has only its code and docs/: no section numbers of a design document."""
    pattern = re.compile(r"\bSPEC\b")
    files = [REPO / "Makefile", REPO / "train.py", REPO / "export_to_torch.py"]
    for folder in ("jax_sae", "extract", "synth", "saebench_eval", "tests", "benchmarks"):
        files += sorted((REPO / folder).rglob("*.py"))
    cited = [
        f"{file.relative_to(REPO)}:{number}"
        for file in files
        for number, line in enumerate(file.read_text().splitlines(), 1)
        if pattern.search(line) and file.name != "test_layout.py"
    ]
    assert not cited, cited
