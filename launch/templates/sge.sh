#!/bin/bash
# BERT pre-training under Grid Engine (ABCI 1.0/2.0 style: -l rt_F=N, qsub -g; or a site's
# parallel environment: -pe NAME slots), written by bert-launch. Edit freely;
# submit with:
#   qsub {{group_option}}{{script_path}}
#
# {{nodes}} node(s) x {{ranks_per_node}} rank(s) started by mpirun, one rank per GPU. h_rt kills the job
# without warning, so the trainer gets train.walltime_s = h_rt - {{stop_margin_s}} s - the time this
# script has used: it checkpoints and exits 75 on its own (a SIGUSR1, e.g. from an s_rt soft
# limit where the site allows one, does the same). This script then submits itself again, held
# until this job has ended, and train.resume=auto continues from the checkpoint. Do not add
# -notify: its warning before the kill is SIGUSR2, which ends this shell before it can resubmit.
# -S /bin/bash: a queue in posix_compliant mode ignores the #! line and would use /bin/sh.
#$ -N {{job_name}}
#$ -l h_rt={{walltime}}
#$ -cwd
#$ -S /bin/bash
#$ -j y
{{optional_directives}}

set -uo pipefail
THIS_SCRIPT={{script_path_quoted}}  # resubmitted on exit 75
MAX_RESUBMITS={{max_resubmits}}
WALLTIME_S={{walltime_s}}
STOP_MARGIN_S={{stop_margin_s}}
RANKS_PER_NODE={{ranks_per_node}}
{{setup}}

# One line per host, in order, with its slots: SGE_JOB_HOSTLIST (ABCI) or PE_HOSTFILE.
# Rank 0 runs on the first host, so that host is the rendezvous master.
# A private file (mktemp: mode 600, unpredictable name) in the job's own temporary directory.
HOSTFILE=$(mktemp "${SGE_LOCALDIR:-${TMPDIR:-/tmp}}/bert-hosts.XXXXXXXX") || exit 1
trap 'rm -f "$HOSTFILE"' EXIT
if [ -n "${SGE_JOB_HOSTLIST:-}" ]; then hosts=$SGE_JOB_HOSTLIST; else hosts=$PE_HOSTFILE; fi
awk '!seen[$1]++ {print $1" slots='"$RANKS_PER_NODE"'"}' "$hosts" > "$HOSTFILE"
NP=$(( $(wc -l < "$HOSTFILE") * RANKS_PER_NODE ))
export MASTER_ADDR=$(head -n 1 "$HOSTFILE" | cut -d ' ' -f 1)
export MASTER_PORT=$((10000 + JOB_ID % 50000))
cpus=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / RANKS_PER_NODE > 0 ? cpus / RANKS_PER_NODE : 1 ))}
{{env_exports}}
echo "bert-launch: job $JOB_ID, $NP ranks, master $MASTER_ADDR:$MASTER_PORT, segment ${BERT_RESUBMITS:-0}"

# A SIGUSR1 to the job must not kill this shell before it can resubmit; mpirun passes it on.
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
    if qsub {{group_option}}-hold_jid "$JOB_ID" -v BERT_RESUBMITS="$next" "$THIS_SCRIPT"; then
        echo "bert-launch: checkpointed; resubmitted $THIS_SCRIPT (segment $next)"
        exit 0
    fi
    echo "bert-launch: checkpointed, but qsub failed; resubmit $THIS_SCRIPT by hand" >&2
elif [ "$status" -ne 0 ]; then
    echo "bert-launch: training failed with exit code $status (mpirun names the failing rank above); not resubmitted" >&2
fi
exit "$status"
