"""Installing certkd as a user would: a wheel that carries its presets, set-up that picks the right
PyTorch build, and a ``certkd --help`` that does not load PyTorch."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(CERTKD_THREADS="1", OMP_NUM_THREADS="1", **extra)
    return env


def test_wheel_installs_presets_and_trains_outside_the_repository(tmp_path):
    """Build the wheel from a copy of the sources, install it into a fresh venv that reuses the installed
    torch (and the other dependencies) through a .pth file, and from a folder outside the repository run
    `certkd presets` and a 1-epoch digits-small training. About 10 s on 2 cores."""
    src = tmp_path / "src-copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(src)], check=True, env=_env(), cwd=tmp_path)
    (wheel,) = wheels.glob("certkd-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # the dependencies (torch, click, ...) from this interpreter's site-packages; its own (editable)
    # certkd is not picked up: the .pth files inside that folder are not processed from here
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                   check=True, env=_env())

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = subprocess.run([str(py), "-c", "import certkd; print(certkd.__file__)"], check=True, cwd=outside,
                           capture_output=True, text=True, env=_env()).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where  # the wheel's copy, not the checkout

    exe = venv / "bin" / "certkd"
    listing = subprocess.run([str(exe), "presets"], check=True, cwd=outside, capture_output=True, text=True,
                             env=_env()).stdout
    lines = {line.split()[0]: line for line in listing.splitlines() if line.strip()}
    assert len(lines) >= 40 and "digits-small" in lines and "mnist-0.1-cpu" in lines
    assert "bundled 8×8 digits" in lines["digits-small"]  # with its description
    proc = subprocess.run([str(exe), "train", "--preset", "digits-small", "--epochs", "1", "--out", "runs/d"],
                          cwd=outside, capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1:" in proc.stdout and (outside / "runs" / "d" / "checkpoints").is_dir()


def test_wheel_declares_the_presets_as_package_data():
    """Fast check of the same: pyproject ships certkd/presets/*.yaml and they are read as resources."""
    from certkd.config import builtin_presets

    text = (REPO / "pyproject.toml").read_text()
    assert '"certkd.presets" = ["*.yaml"]' in text
    presets = builtin_presets()
    assert "digits-small" in presets and len(presets) == len(list((REPO / "src/certkd/presets").glob("*.yaml")))
    assert not (REPO / "configs").exists()  # one copy of the presets


def test_user_preset_folder_and_file_still_work(tmp_path, monkeypatch):
    from certkd.config import list_presets, preset_description, resolve_config

    (tmp_path / "mine.yaml").write_text("# My own preset. More words.\nmodel: mlp\neps: 2/255\n")
    assert resolve_config(str(tmp_path / "mine.yaml")).eps == pytest.approx(2 / 255)
    monkeypatch.setenv("CERTKD_CONFIG_DIR", str(tmp_path))
    assert "mine" in list_presets() and "digits-small" in list_presets()
    assert resolve_config("mine").model == "mlp"
    assert preset_description("mine") == "My own preset."


def _setup_dry_run(path_prefix: Path, **extra) -> str:
    env = _env(PATH=f"{path_prefix}:{os.environ.get('PATH', '/usr/bin:/bin')}", **extra)
    env.pop("CERTKD_TORCH_VERSION", None)
    if "CERTKD_TORCH_BUILD" not in extra:
        env.pop("CERTKD_TORCH_BUILD", None)
    return subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), "--dry-run"], check=True, env=env,
                          capture_output=True, text=True).stdout


def _fake_nvidia_smi(folder: Path, gpu: bool) -> Path:
    folder.mkdir()
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + ('echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"\n' if gpu else
                                       'echo "NVIDIA-SMI has failed: no devices were found" >&2\nexit 9\n'))
    script.chmod(0o755)
    return folder


def test_setup_installs_a_cpu_torch_without_gpu_and_the_default_build_with_one(tmp_path):
    version = next(line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines()
                   if line.startswith("torch-version"))
    cpu = _setup_dry_run(_fake_nvidia_smi(tmp_path / "nogpu", gpu=False)).splitlines()
    assert cpu[1:] == [f"pip install torch=={version}+cpu",
                       f"pip install torch=={version} --index-url https://download.pytorch.org/whl/cpu"]
    gpu_bin = _fake_nvidia_smi(tmp_path / "gpu", gpu=True)
    gpu = _setup_dry_run(gpu_bin).splitlines()
    assert gpu[1:] == [f"pip install torch=={version}"]
    # the user's choice wins either way
    assert _setup_dry_run(gpu_bin, CERTKD_TORCH_BUILD="cpu").splitlines()[1:] == cpu[1:]
    assert _setup_dry_run(tmp_path / "nogpu", CERTKD_TORCH_BUILD="default").splitlines()[1:] == gpu[1:]
    script = (REPO / "scripts" / "setup.sh").read_text()
    assert "2>/dev/null ||" not in script and "|| true" not in script  # pip's errors are shown and fail the set-up
    assert version not in script  # the version is written in pyproject only


def test_installed_torch_satisfies_the_project_requirement():
    """setup.sh installs torch first; installing certkd must then not re-resolve it."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    req = next(Requirement(r) for r in requires("certkd") if r.startswith("torch"))
    assert req.specifier.contains(version("torch").split("+")[0], prereleases=True)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["verify", "--help"], ["presets"], ["--version"]])
def test_help_does_not_import_torch(argv):
    code = ("import sys\nfrom certkd.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n" % (argv,))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr


def test_no_extra_pulls_torchvision_and_no_module_imports_it():
    """certkd never imports torchvision (the image readers need Pillow only); `pip install certkd[vision]` pulled
    it anyway, dragging in a CUDA torch of another version or one that fails to import beside the CPU torch."""
    import ast

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    named = [req for reqs in [project["dependencies"]] + list(extras.values()) for req in reqs]
    assert not [req for req in named if "torchvision" in req.lower()], named
    assert [req.lower() for req in extras["vision"]] == ["pillow"]
    importers = []
    for path in sorted((REPO / "src" / "certkd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "torchvision" for n in names):
                importers.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not importers, importers
