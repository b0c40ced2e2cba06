"""Pick the `srun --mpi=` plugin that the MPI behind this Python's mpi4py can wire up through.

    SRUN_MPI=$(srun --mpi=list 2>&1 | "$PY" slurm/pmi.py)

reads the plugins Slurm offers on stdin and prints one of them.  Why not simply "pmix when listed": the MPICH
that `make` installs from PyPI speaks PMI-1/PMI-2 only, and under a PMIx step it aborts in MPI_Init ("Runtime
environment uses unsupported PMI version PMIx").  Open MPI 5 speaks PMIx only.  So the choice follows the
library, which is asked for its version *without* MPI_Init (mpi4py.rc.initialize = False), and fltorrent_hpc
is not imported here because its import initialises MPI.  SRUN_MPI set by the caller is never overridden: the
scripts call this only when it is unset.  Exit status 2, with the reason on stderr, when Slurm offers no
plugin the library speaks.
"""

from __future__ import annotations

import re
import sys

# Slurm's MPI plugin names, as `srun --mpi=list` prints them (pmix also as pmix_v3, pmix_v4, ...).
_PLUGIN = re.compile(r"^(none|pmi2|pmix(_v\d+)?|cray_shasta)$")


def library_version() -> str:
    """MPI_Get_library_version of the MPI mpi4py loads, queried before (and without) MPI_Init."""
    import mpi4py

    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = False
    from mpi4py import MPI

    return MPI.Get_library_version()


def wanted(libver: str) -> list[str]:
    """Plugins this MPI library can start under, most preferred first."""
    text = libver.lower()
    pmix_built = "pmix" in text  # the configure line names it (--with-pmix, --with-pmi=pmix, ...)
    if "open mpi" in text:
        return ["pmix", "pmi2"]  # Open MPI 5: PMIx only; 4.x also pmi2 when built --with-pmi
    if "intel(r) mpi" in text or "intel mpi" in text:
        return ["pmi2", "pmix"]
    if "cray" in text:
        return ["cray_shasta", "pmix", "pmi2"]  # Cray MPICH on Slingshot (HPE Cray EX)
    if "mpich" in text or "mvapich" in text:
        return ["pmix", "pmi2"] if pmix_built else ["pmi2"]  # the PyPI mpich wheel: hydra build, no PMIx
    return ["pmix", "pmi2"]  # unknown library: the old rule


def listed(srun_list: str) -> list[str]:
    """Plugin names in the output of `srun --mpi=list` (its format varies across Slurm versions)."""
    words = re.findall(r"[A-Za-z0-9_]+", srun_list)
    return list(dict.fromkeys(w for w in words if _PLUGIN.match(w)))


def choose(libver: str, offered: list[str]) -> str:
    """The first wanted plugin that Slurm offers; raise ValueError when none is offered.

    With an empty list (srun --mpi=list failed), trust the library and take its first choice.
    """
    want = wanted(libver)
    if not offered:
        return want[0]
    for w in want:
        if w in offered:
            return w
        if w == "pmix":
            versioned = sorted((p for p in offered if p.startswith("pmix_")), key=lambda p: int(p[6:]))
            if versioned:
                return versioned[-1]
    name = libver.strip().splitlines()[0] if libver.strip() else "unknown MPI"
    raise ValueError(
        f"srun offers {', '.join(offered)} but {name} needs one of {', '.join(want)}; build mpi4py against the "
        "site MPI (see slurm/README.md) or set SRUN_MPI yourself"
    )


def main() -> int:
    try:
        libver = library_version()
    except Exception as exc:  # no usable mpi4py: the old rule, with a note why
        print(f"slurm/pmi.py: cannot ask mpi4py for the MPI library ({exc}); guessing", file=sys.stderr)
        libver = ""
    try:
        print(choose(libver, listed(sys.stdin.read())))
    except ValueError as exc:
        print(f"slurm/pmi.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
