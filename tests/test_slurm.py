"""The sbatch scripts' launch logic under a faked Slurm: which `srun --mpi=` they pick, and where output goes.

No Slurm and no MPI launch: each script runs under bash with SLURM_*/PMIx variables set, a stand-in `srun`
first on PATH that records its arguments, and VENV pointing at a stand-in interpreter.  "PyPI MPICH" is the real
mpi4py + mpich of this environment; a PMIx-capable site MPI is a fake `mpi4py` package on that interpreter's
path whose MPI.Get_library_version() names it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["train", "study", "bench"]
OPEN_MPI = "Open MPI v5.0.5, package: Open MPI builder Distribution, ident: 5.0.5, repo rev: v5.0.5"
MPICH_PMIX = "MPICH Version:      4.2.3\nMPICH configure:    --prefix=/opt/mpich --with-pmix=/usr --with-device=ch4:ofi"
CRAY = "MPI VERSION    : CRAY MPICH version 8.1.30.8 (ANL base 3.4a2)"

FAKE_SRUN = """#!/bin/bash
case "$1" in
  --mpi=list) printf 'MPI plugin types are...\\n\\tnone\\n%s\\n' "$FAKE_SRUN_LIST" | tr ' ' '\\n'; exit 0 ;;
  --version) echo "slurm 24.05.4"; exit 0 ;;
esac
printf '%s\\n' "$*" >> "$SRUN_LOG"
"""

# A stand-in mpi4py: refuses to be imported for MPI unless initialisation is off, as slurm/pmi.py must do.
FAKE_MPI4PY = {
    "mpi4py/__init__.py": "__version__ = '4.1.2'\n\n\nclass rc:\n    initialize = True\n    finalize = True\n",
    "mpi4py/MPI.py": (
        "import os\nimport mpi4py\n\n"
        "if mpi4py.rc.initialize:\n"
        "    raise SystemExit('fake mpi4py: imported with rc.initialize=True (would MPI_Init)')\n\n\n"
        "def Get_library_version():\n    return os.environ['FAKE_MPI_LIBVER']\n"
    ),
}


def _pmi_module():
    spec = importlib.util.spec_from_file_location("slurm_pmi", REPO / "slurm" / "pmi.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def pmi():
    return _pmi_module()


def _setup(tmp_path: Path, libver: str | None) -> tuple[Path, dict]:
    """A submit directory holding slurm/, a fake srun on PATH and a VENV whose python sees the chosen MPI."""
    submit = tmp_path / "submit"
    shutil.copytree(REPO / "slurm", submit / "slurm")
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    (fakebin / "srun").write_text(FAKE_SRUN)
    (fakebin / "srun").chmod(0o755)
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    pypath = ""
    if libver is not None:
        fake = tmp_path / "fake_site"
        for rel, text in FAKE_MPI4PY.items():
            (fake / rel).parent.mkdir(parents=True, exist_ok=True)
            (fake / rel).write_text(text)
        pypath = f"PYTHONPATH={fake} "
    (venv_bin / "python").write_text(f'#!/bin/sh\n{pypath}exec "{sys.executable}" "$@"\n')
    (venv_bin / "python").chmod(0o755)
    env = {
        "PATH": f"{fakebin}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "VENV": str(tmp_path / "venv"),
        "SRUN_LOG": str(tmp_path / "srun.log"),
        "FAKE_SRUN_LIST": "pmi2 pmix pmix_v4",
        "FAKE_MPI_LIBVER": libver or "",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "4",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_CPUS_PER_TASK": "1",
        "SLURM_SUBMIT_DIR": str(submit),
        "SLURM_MPI_TYPE": "pmix",  # a PMIx site: the batch step itself carries PMIx variables
        "PMIX_NAMESPACE": "slurm.pmix.4242.batch",
        "PMIX_RANK": "0",
        "PMIX_VERSION": "4.2.9",
        "PMIX_SERVER_URI41": "pmix-server.1234;tcp4://127.0.0.1:40000",
    }
    return submit, env


def _run(script: str, tmp_path: Path, libver: str | None, extra_env=None, args=()) -> tuple[int, str, list[str]]:
    submit, env = _setup(tmp_path, libver)
    env.update({"SLURM_JOB_NAME": f"fltorrent-{script}", **(extra_env or {})})
    p = subprocess.run(
        ["bash", str(submit / "slurm" / f"{script}.sbatch"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = Path(env["SRUN_LOG"])
    calls = log.read_text().splitlines() if log.exists() else []
    return p.returncode, p.stdout + p.stderr, calls


CASES = [  # (id, fake library version or None for this venv's PyPI MPICH, srun list, SRUN_MPI, expected)
    ("pypi-mpich", None, "pmi2 pmix pmix_v4", None, "pmi2"),
    ("open-mpi", OPEN_MPI, "pmi2 pmix pmix_v4", None, "pmix"),
    ("mpich-with-pmix", MPICH_PMIX, "pmi2 pmix", None, "pmix"),
    ("open-mpi-versioned-pmix", OPEN_MPI, "pmi2 pmix_v3 pmix_v4", None, "pmix_v4"),
    ("override-wins", OPEN_MPI, "pmi2 pmix", "pmi2", "pmi2"),
]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    ("libver", "offered", "override", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_script_launches_with_the_pmi_the_mpi_speaks(tmp_path, script, libver, offered, override, expected):
    extra = {"FAKE_SRUN_LIST": offered, "ROUNDS": "2"}
    if override:
        extra["SRUN_MPI"] = override
    rc, out, calls = _run(script, tmp_path, libver, extra, args=("--rounds", "2") if script == "train" else ())
    assert rc == 0, out
    assert calls, f"{script}.sbatch launched nothing:\n{out}"
    for call in calls:
        assert call.startswith(f"--mpi={expected} "), f"{script}.sbatch: srun {call}\n{out}"
    job = {"train": "jobs/fedavg_train.py", "study": "jobs/fedavg_train.py", "bench": "jobs/bench_allgather.py"}
    main = [c for c in calls if job[script] in c]
    assert main and any(" -n 4 " in c for c in main), calls


def test_study_sim_step_gets_the_pmi_flag_too(tmp_path):
    """A one-task step still runs MPI_Init (import fltorrent_hpc), so it needs the same plugin."""
    rc, out, calls = _run("study", tmp_path, None, {"STUDY": "sim"})
    assert rc == 0, out
    assert calls == [c for c in calls if c.startswith("--mpi=pmi2 -n 1 ")] and "jobs/scaling_study.py" in calls[0]


def test_pypi_mpich_on_a_pmix_only_slurm_fails_early_with_a_reason(tmp_path):
    rc, out, calls = _run("train", tmp_path, None, {"FAKE_SRUN_LIST": "pmix pmix_v4"})
    assert rc != 0
    assert calls == []
    assert "slurm/README.md" in out and "MPICH" in out


@pytest.mark.parametrize("script", SCRIPTS)
def test_output_goes_where_a_fresh_clone_has_a_directory(script):
    text = (REPO / "slurm" / f"{script}.sbatch").read_text()
    outputs = re.findall(r"^#SBATCH\s+(?:--output|-o)[=\s]+(\S+)", text, flags=re.M)
    assert outputs, f"{script}.sbatch sets no --output"
    for out in outputs:
        d = os.path.dirname(out)
        if not d:
            continue  # the submit directory
        tracked = subprocess.run(["git", "ls-files", d], cwd=REPO, capture_output=True, text=True).stdout
        assert tracked.strip(), f"{script}.sbatch writes its log into {d}/, which a fresh clone lacks"


def test_detection_does_not_initialise_mpi_under_pmix(pmi, tmp_path):
    """The real PyPI MPICH aborts in MPI_Init under PMIx; asking its version must not get that far."""
    _, env = _setup(tmp_path, None)
    p = subprocess.run(
        [sys.executable, str(REPO / "slurm" / "pmi.py")],
        input="pmi2 pmix",
        env={**os.environ, **{k: v for k, v in env.items() if k.startswith(("PMIX", "SLURM"))}},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (p.returncode, p.stdout.strip()) == (0, "pmi2"), p.stderr
    assert "MPICH" in pmi.library_version()


@pytest.mark.parametrize(
    ("libver", "offered", "expected"),
    [
        ("MPICH Version: 5.0.2\nMPICH configure: --with-pm=hydra:gforker", ["pmi2", "pmix"], "pmi2"),
        (OPEN_MPI, ["pmi2", "pmix"], "pmix"),
        (OPEN_MPI, ["pmi2"], "pmi2"),
        (CRAY, ["cray_shasta", "pmi2", "pmix"], "cray_shasta"),
        ("Intel(R) MPI Library 2021.12 for Linux* OS", ["pmi2", "pmix"], "pmi2"),
        ("MVAPICH2 Version: 2.3.7", ["pmi2", "pmix"], "pmi2"),
        ("", ["pmi2", "pmix"], "pmix"),
        (OPEN_MPI, [], "pmix"),
    ],
)
def test_choose(pmi, libver, offered, expected):
    assert pmi.choose(libver, offered) == expected


def test_choose_refuses_when_nothing_fits(pmi):
    with pytest.raises(ValueError, match="MPICH Version: 5.0.2.*needs one of pmi2"):
        pmi.choose("MPICH Version: 5.0.2", ["pmix"])


def test_listed_parses_srun_output(pmi):
    text = "srun: MPI types are...\nsrun: none\nsrun: cray_shasta\nsrun: pmi2\nsrun: pmix\n"
    text += "specific pmix plugin versions available: pmix_v4\n"
    assert pmi.listed(text) == ["none", "cray_shasta", "pmi2", "pmix", "pmix_v4"]
