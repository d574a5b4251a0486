"""How Otter installs: its version, the `otter` and `python -m otter` commands, the wheel, the core and its extras."""

import importlib.metadata
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import otter
from otter.cli import main

ROOT = Path(__file__).resolve().parent.parent
# the import names of what the train, eval and serve extras add to the core (pyproject.toml's optional-dependencies)
EXTRA_MODULES = ["webdataset", "braceexpand", "peft", "pyarrow", "tensorboard", "pycocoevalcap", "nltk", "inflection",
                 "sklearn", "fastapi", "uvicorn", "prometheus_client"]


def test_the_version_is_the_installed_distributions():
    assert otter.__version__ == importlib.metadata.version("otter-flamingo")


def test_otter_and_python_m_otter_print_the_version():
    script = Path(sysconfig.get_path("scripts")) / "otter"
    command = str(script) if script.exists() else shutil.which("otter")
    assert command, "the otter command is not installed"
    runs = [subprocess.Popen(line, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for line in ([command, "--version"], [sys.executable, "-m", "otter", "--version"])]
    for run in runs:
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
        assert stdout.startswith(f"otter {otter.__version__} (Python "), stdout
        assert "torch " in stdout and "transformers " in stdout


def _wheel(tmp_path: Path) -> zipfile.ZipFile:
    """A wheel built offline from what the build reads of this checkout (no build isolation, no index)."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} predates pyproject.toml's license expression (77)")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "requirements.txt", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source)
    for folder in ("otter", "conversion", "train", "eval"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    return zipfile.ZipFile(next((tmp_path / "dist").glob("otter_flamingo-*.whl")))


def test_the_wheel_ships_the_model_with_its_card_the_subpackages_and_mit_metadata(tmp_path):
    with _wheel(tmp_path) as wheel:
        names = set(wheel.namelist())
        info = f"otter_flamingo-{otter.__version__}.dist-info"
        metadata = Parser().parsestr(wheel.read(f"{info}/METADATA").decode())
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    shipped = {f"otter/models/shapesworld/{name}" for name in
               ("README.md", "config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
                "tokenizer_config.json", "generation_config.json", "results.md")}
    assert shipped <= names
    package_files = {"otter/" + path.relative_to(ROOT / "otter").as_posix() for path in (ROOT / "otter").rglob("*")
                     if path.is_file() and "__pycache__" not in path.parts}
    assert package_files <= names, "files of otter/ the package would lack (package data: the chat template, ...)"
    assert {"otter/__main__.py", "otter/conversion/openflamingo.py", "otter/train/trainer.py", "otter/eval/tasks.py",
            "otter/train/configs/ddp.yaml", "otter/train/README.md"} <= names
    assert not any(name.startswith(("conversion/", "train/", "eval/", "tests/")) for name in names)
    assert metadata["Version"] == otter.__version__
    assert metadata["License-Expression"] == "MIT"
    requirements = metadata.get_all("Requires-Dist")
    core = {line.split(">")[0].split("<")[0].split(";")[0] for line in requirements if "extra ==" not in line}
    assert {"torch", "transformers", "open_clip_torch"} <= core
    assert not core & {"webdataset", "peft", "pycocoevalcap", "scikit-learn", "pyarrow"}, "extras in the core"
    assert any(line.startswith("webdataset") and 'extra == "train"' in line for line in requirements)
    assert any(line.startswith("scikit-learn") and 'extra == "eval"' in line for line in requirements)
    assert "otter = otter.cli:main" in entry_points


def test_the_core_runs_the_demo_without_the_extras(tmp_path):
    """`pip install otter-flamingo && otter demo`: the README's first command needs nothing from the extras."""
    page = tmp_path / "demo.html"
    code = ("import sys\n"
            f"for name in {EXTRA_MODULES!r}:\n"
            "    sys.modules[name] = None  # import name -> ModuleNotFoundError, as when it is not installed\n"
            "from otter.cli import main\n"
            f"main(['demo', '--episodes', '1', '--out', {str(page)!r}])\n"
            f"assert not set({EXTRA_MODULES!r}) & {{name for name, module in sys.modules.items() if module}}\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert page.is_file() and "correct" in run.stdout


@pytest.mark.parametrize("command, extra, missing", [
    (["train", "finetune", "--model", "m", "--data", "d.jsonl", "--out"], "train", ["webdataset", "peft"]),
    (["eval", "--model", "m", "--task", "coco", "--data-dir", "d", "--out"], "eval", ["pycocoevalcap"]),
    (["serve", "--model", "m", "--served-model-name"], "serve", ["fastapi", "uvicorn"]),
])
def test_train_eval_and_serve_name_a_missing_extra_before_they_start(tmp_path, monkeypatch, capsys, command, extra,
                                                               missing):
    installed = importlib.metadata.version

    def version(name):
        if name in missing:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main([*command, str(out)])
    assert exit_.value.code == 1
    error = capsys.readouterr().err
    assert f"needs Otter's {extra} extra" in error and f"pip install 'otter-flamingo[{extra}]'" in error
    assert all(name in error for name in missing)
    assert not out.exists()
