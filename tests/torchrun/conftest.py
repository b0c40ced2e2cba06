"""Tests here run only under torchrun (tests/test_torchrun.py launches them); a plain pytest run skips them.

They share tests/mpi/'s checking code (transport_contract.py, dist_harness.py), put on the path here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mpi"))
collect_ignore_glob = [] if "TORCHELASTIC_RUN_ID" in os.environ else ["test_*.py"]
