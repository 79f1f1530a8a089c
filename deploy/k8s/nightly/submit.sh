#!/bin/sh
# Submit one RayJob and wait for it to finish: exit 0 when its Ray job succeeded, 1 otherwise.
#
# The nightly CronJob runs this (concurrencyPolicy: Forbid). Because it waits, a run that is still going when
# the next night comes keeps the next one from starting; and because it deletes its RayJob when it gives up
# (its deadline, or SIGTERM from the CronJob's activeDeadlineSeconds), no rebuild outlives its slot.
#
# Settings (environment):
#   RAYJOB_MANIFEST       the RayJob to create (default /etc/scvi-scale/rayjob/rayjob.yaml); it uses
#                         metadata.generateName, so every run gets a fresh name
#   NAMESPACE             where to create it (default: kubectl's current namespace)
#   WAIT_TIMEOUT_SECONDS  give up after this long (default 25200 = 7 h)
#   POLL_SECONDS          how often to look at .status (default 30)
# POSIX sh only: the submitter image is registry.k8s.io/kubectl, whose /bin/sh is dash.
set -eu

manifest="${RAYJOB_MANIFEST:-/etc/scvi-scale/rayjob/rayjob.yaml}"
namespace="${NAMESPACE:-}"
timeout_s="${WAIT_TIMEOUT_SECONDS:-25200}"
poll_s="${POLL_SECONDS:-30}"
name=""
sleeper=""

log() {
    printf '%s submit: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"
}

# kubectl with the namespace, if one was given
kc() {
    if [ -n "$namespace" ]; then
        kubectl --namespace "$namespace" "$@"
    else
        kubectl "$@"
    fi
}

field() {
    kc get "$name" -o "jsonpath={$1}" 2>/dev/null || true
}

give_up() {
    if [ -n "$sleeper" ]; then
        kill "$sleeper" 2>/dev/null || true
    fi
    log "$1; deleting $name so that it cannot overlap the next run"
    kc delete "$name" --wait=false || log "could not delete $name"
    exit 1
}

case "$timeout_s$poll_s" in
    *[!0-9]*)
        log "WAIT_TIMEOUT_SECONDS and POLL_SECONDS must be whole seconds (got '$timeout_s', '$poll_s')"
        exit 2
        ;;
esac
if [ ! -r "$manifest" ]; then
    log "no RayJob manifest at $manifest"
    exit 2
fi

name="$(kc create -f "$manifest" -o name)"
log "created $name"
trap 'give_up "stopped (SIGTERM)"' TERM INT

deadline=$(($(date +%s) + timeout_s))
last="-"
while :; do
    status="$(field .status.jobDeploymentStatus)"
    if [ "$status" != "$last" ]; then
        log "$name: jobDeploymentStatus=${status:-<none yet>} jobStatus=$(field .status.jobStatus)"
        last="$status"
    fi
    case "$status" in
        Complete)
            job_status="$(field .status.jobStatus)"
            if [ "$job_status" = "SUCCEEDED" ]; then
                log "$name succeeded"
                exit 0
            fi
            log "$name finished with jobStatus=$job_status: $(field .status.message)"
            exit 1
            ;;
        Failed | ValidationFailed)
            log "$name failed ($(field .status.reason)): $(field .status.message)"
            exit 1
            ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        give_up "no result after ${timeout_s}s"
    fi
    # sleep in the background so that a SIGTERM is handled at once, not after the sleep
    sleep "$poll_s" &
    sleeper=$!
    wait "$sleeper" || true
    sleeper=""
done
