#!/bin/bash
# BERT pre-training with a plain mpirun (Open MPI) on hosts you name, written by bert-launch.
# Edit freely; run with:
#   bash {{script_path}}
#
# {{nodes}} node(s) x {{ranks_per_node}} rank(s), one rank per GPU. No scheduler resubmits here:
# on SIGUSR1 or SIGTERM the ranks finish the step, write a checkpoint and exit 75; run this
# script again and train.resume=auto continues from that checkpoint.
set -uo pipefail
HOSTFILE={{hostfile_quoted}}  # "host slots=N" per line; empty: this machine only
NODES={{nodes}}
RANKS_PER_NODE={{ranks_per_node}}
{{setup}}

# Rank 0 runs on the first host of the hostfile (or here), so that host is the rendezvous master.
if [ -n "$HOSTFILE" ]; then
    HOSTS=(-hostfile "$HOSTFILE" -map-by ppr:"$RANKS_PER_NODE":node)
    export MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
    export MASTER_PORT=${MASTER_PORT:-29500}
else
    HOSTS=()
    export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
    export MASTER_PORT=${MASTER_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
fi
cpus=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / RANKS_PER_NODE > 0 ? cpus / RANKS_PER_NODE : 1 ))}
{{env_exports}}
# Open MPI refuses to run as root unless told (containers and CI run as root).
if [ "$(id -u)" -eq 0 ]; then AS_ROOT=(--allow-run-as-root); else AS_ROOT=(); fi
echo "bert-launch: $((NODES * RANKS_PER_NODE)) ranks, master $MASTER_ADDR:$MASTER_PORT"

# -x passes variables to the ranks on other hosts (Open MPI / HPC-X; Intel MPI: -genv).
mpirun "${AS_ROOT[@]}" -np $((NODES * RANKS_PER_NODE)) "${HOSTS[@]}" -bind-to none --tag-output \
    -x MASTER_ADDR -x MASTER_PORT -x OMP_NUM_THREADS -x PATH \
    ${LD_LIBRARY_PATH:+-x LD_LIBRARY_PATH} ${PYTHONPATH:+-x PYTHONPATH} ${VIRTUAL_ENV:+-x VIRTUAL_ENV}{{mpirun_env}} \
    {{container}}{{command}}
status=$?
if [ "$status" -eq 75 ]; then
    echo "bert-launch: checkpointed and stopped on request; run $0 again to continue" >&2
fi
exit "$status"
