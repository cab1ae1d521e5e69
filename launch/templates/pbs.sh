#!/bin/bash
# BERT pre-training under PBS Professional (ABCI 3.0 style), written by bert-launch. Edit freely;
# submit with:
#   qsub {{script_path}}
#
# {{nodes}} node(s) x {{ranks_per_node}} rank(s) started by mpirun, one rank per GPU. PBS sends no
# warning before the wall time, so the trainer gets train.walltime_s = wall time - {{stop_margin_s}} s
# - the time this script has used: it checkpoints and exits 75 on its own. This script then
# submits itself again, to start once this job has ended, and train.resume=auto continues.
#PBS -N {{job_name}}
#PBS -l select={{nodes}}:mpiprocs={{ranks_per_node}}
#PBS -l walltime={{walltime}}
#PBS -j oe
{{optional_directives}}

set -uo pipefail
cd "${PBS_O_WORKDIR:-.}"
THIS_SCRIPT={{script_path_quoted}}  # resubmitted on exit 75
MAX_RESUBMITS={{max_resubmits}}
WALLTIME_S={{walltime_s}}
STOP_MARGIN_S={{stop_margin_s}}
RANKS_PER_NODE={{ranks_per_node}}
{{setup}}

# PBS_NODEFILE repeats each host mpiprocs times: one line per host, in order, with its slots.
# Rank 0 runs on the first host, so that host is the rendezvous master.
# A private file (mktemp: mode 600, unpredictable name) in the job's own temporary directory.
HOSTFILE=$(mktemp "${TMPDIR:-${PBS_JOBDIR:-/tmp}}/bert-hosts.XXXXXXXX") || exit 1
trap 'rm -f "$HOSTFILE"' EXIT
awk '!seen[$1]++ {print $1" slots='"$RANKS_PER_NODE"'"}' "$PBS_NODEFILE" > "$HOSTFILE"
NP=$(( $(wc -l < "$HOSTFILE") * RANKS_PER_NODE ))
export MASTER_ADDR=$(head -n 1 "$HOSTFILE" | cut -d ' ' -f 1)
export MASTER_PORT=$((10000 + ${PBS_JOBID%%.*} % 50000))
cpus=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / RANKS_PER_NODE > 0 ? cpus / RANKS_PER_NODE : 1 ))}
{{env_exports}}
echo "bert-launch: job $PBS_JOBID, $NP ranks, master $MASTER_ADDR:$MASTER_PORT, segment ${BERT_RESUBMITS:-0}"

# `qsig -s USR1 <job id>` asks the ranks to checkpoint and stop early: this shell must survive
# it to resubmit (mpirun passes it on to the ranks).
trap 'echo "bert-launch: SIGUSR1: the ranks checkpoint and stop"' USR1
# -x passes variables to the ranks on other hosts (Open MPI / HPC-X; Intel MPI: -genv).
mpirun -np "$NP" -hostfile "$HOSTFILE" -map-by ppr:"$RANKS_PER_NODE":node -bind-to none --tag-output \
    -x MASTER_ADDR -x MASTER_PORT -x OMP_NUM_THREADS -x PATH \
    ${LD_LIBRARY_PATH:+-x LD_LIBRARY_PATH} ${PYTHONPATH:+-x PYTHONPATH} ${VIRTUAL_ENV:+-x VIRTUAL_ENV}{{mpirun_env}} \
    {{container}}{{command}}
status=$?

if [ "$status" -eq 75 ]; then
    next=$(( ${BERT_RESUBMITS:-0} + 1 ))
    if [ "$next" -gt "$MAX_RESUBMITS" ]; then
        echo "bert-launch: checkpointed after $MAX_RESUBMITS resubmissions; resubmit by hand to continue" >&2
        exit 75
    fi
    if qsub -W depend=afterany:"$PBS_JOBID" -v BERT_RESUBMITS="$next" "$THIS_SCRIPT"; then
        echo "bert-launch: checkpointed; resubmitted $THIS_SCRIPT (segment $next)"
        exit 0
    fi
    echo "bert-launch: checkpointed, but qsub failed; resubmit $THIS_SCRIPT by hand" >&2
elif [ "$status" -ne 0 ]; then
    echo "bert-launch: training failed with exit code $status (mpirun names the failing rank above); not resubmitted" >&2
fi
exit "$status"
