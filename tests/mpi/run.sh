#!/usr/bin/env bash
# MPI test tier: each file in its own mpiexec (a torch default group is per process), world size 4 for all,
# plus the engine suite at 1, 2, 3 and 7 ranks.  Usage: tests/mpi/run.sh VENV_BIN
set -uo pipefail
BIN=${1:-.venv/bin}
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
fail=0
passed=0
run() {  # run NP FILE
  local np=$1 file=$2
  local log="/tmp/fltorrent-mpi-$np-$(basename "$file" .py)"
  echo "=== mpiexec -n $np pytest --with-mpi $file"
  # rank 0 reports for all ranks (tests/mpi/conftest.py); ranks > 0 write $log.rankR.log
  FLTORRENT_MPI_LOG="$log" timeout 900 "$BIN/mpiexec" -n "$np" "$BIN/python" -m pytest --with-mpi -q \
    -p no:cacheprovider "$file" > "$log.log" 2>&1
  local rc=$?
  # the gathered line ("N ranks: ...") where there are several ranks, else pytest's own closing line
  { grep -E "^[0-9]+ ranks: " "$log.log" || grep -E "passed|failed|error|skipped" "$log.log"; } | tail -1
  if [ $rc -ne 0 ]; then
    echo "FAILED (rc=$rc): $file at $np ranks; rank 0's log follows"; tail -80 "$log.log"
    fail=$((fail + 1))
  else
    passed=$((passed + 1))
  fi
}
for f in tests/mpi/test_*.py; do run 4 "$f"; done
for np in 1 2 3 7; do run "$np" tests/mpi/test_engine.py; done
# the pipelined BitTorrent phase at 2 and 7 ranks too (4 above)
for np in 2 7; do run "$np" tests/mpi/test_pipeline.py; done
# the misbehaving-peer suites and the attacked real round at 7 ranks too (4 above)
# (test_robust's BitTorrent faults there in the default, pipelined mode only: both modes run at 4 ranks)
for f in tests/mpi/test_integrity.py tests/mpi/test_robust.py tests/mpi/test_transport.py tests/mpi/test_privacy_engine.py \
  tests/mpi/test_direct.py; do
  FLTORRENT_TEST_BT=pipelined run 7 "$f"
done
echo "mpi: $passed passed, $fail failed"
exit $(( fail > 0 ))
