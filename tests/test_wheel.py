"""Packaging: a built wheel carries kernels/*.cu as package data and an installed copy finds them.

The .cu sources live once, in the repository's kernels/; pyproject.toml maps the package
fltorrent_hpc.chunks.cuda onto that folder.  The wheel is built from a copy of the sources (no build/ or
egg-info left in the checkout), installed with `pip --target`, and imported by `python -I` with that
target first on sys.path, so neither the checkout nor an editable install can stand in for it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fltorrent_hpc.chunks import kernels as K

REPO = Path(__file__).resolve().parents[1]
CU_FILES = sorted(p.name for p in (REPO / "kernels").glob("*.cu"))

PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import fltorrent_hpc.chunks.kernels as K
print(json.dumps({"module": K.__file__, "dir": str(K.KERNEL_DIR), "sources": [str(p) for p in K.kernel_sources()]}))
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, (
        f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )
    return res.stdout


@pytest.mark.slow
def test_wheel_ships_kernels_and_installed_copy_finds_them(tmp_path: Path) -> None:
    pytest.importorskip("setuptools", minversion="77", reason="building the wheel offline needs setuptools>=77")
    assert CU_FILES, f"no .cu sources in {REPO / 'kernels'}"
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("fltorrent_hpc", "kernels"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FLTORRENT_KERNELS_DIR")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    pip = [sys.executable, "-m", "pip"]

    out = tmp_path / "dist"
    _run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out)], tmp_path, env)
    (whl,) = out.glob("fltorrent_hpc-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    shipped = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("fltorrent_hpc/chunks/cuda/"))
    assert shipped == CU_FILES, f"wheel has {shipped} under fltorrent_hpc/chunks/cuda/, kernels/ has {CU_FILES}"
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "fltorrent_hpc").rglob("*.py")}
    assert modules <= names, (
        f"modules missing from the wheel (list their packages in pyproject.toml): {modules - names}"
    )

    site = tmp_path / "site"
    _run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(whl)], tmp_path, env)
    got = json.loads(_run([sys.executable, "-I", "-c", PROBE, str(site)], tmp_path, env).strip().splitlines()[-1])

    installed = (site / "fltorrent_hpc").resolve()
    assert Path(got["module"]).resolve().is_relative_to(installed), f"imported {got['module']}, not the wheel"
    assert Path(got["dir"]).resolve() == installed / "chunks" / "cuda"
    sources = [Path(p) for p in got["sources"]]
    assert sources and {p.name for p in sources} <= set(CU_FILES)
    for p in sources:
        assert p.is_file(), f"kernel_sources() names {p}, which does not exist"
        assert p.read_bytes() == (REPO / "kernels" / p.name).read_bytes()


def test_kernel_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """FLTORRENT_KERNELS_DIR wins; without it a source checkout (no chunks/cuda/ folder) uses its kernels/."""
    monkeypatch.setenv("FLTORRENT_KERNELS_DIR", str(tmp_path))
    assert K._kernel_dir() == tmp_path
    monkeypatch.delenv("FLTORRENT_KERNELS_DIR")
    if not Path(K.__file__).resolve().is_relative_to(REPO):
        pytest.skip(f"fltorrent_hpc imported from {K.__file__}, not from this checkout")
    assert K._kernel_dir() == REPO / "kernels"
    assert sorted(p.name for p in K.kernel_sources()) == CU_FILES
