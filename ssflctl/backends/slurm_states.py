"""Every Slurm job state and pending reason, mapped to ssflctl's own kinds.

Sources (what the tables below were checked against):

* job states: ``job_state_string()`` in ``src/common/slurm_protocol_defs.c`` and the ``enum
  job_states`` / ``JOB_*`` state flags in ``slurm/slurm.h`` of Slurm 22.05.8 (the version installed
  here, Debian 12 ``slurm-wlm 22.05.8``) and of Slurm 25.11 (which adds ``EXPEDITING``); the
  "JOB STATE CODES" sections of ``man sacct`` / ``man squeue`` (22.05). ``sacct --helpstate`` and
  ``squeue --helpstate`` exist from Slurm 24.05 on; 22.05's squeue prints the same list after
  "Valid job states include:" when given an unknown state (``squeue -t x``).
  ``tests/test_slurm_states.py`` runs whichever of these the installed Slurm has and fails on any
  state missing here.
* pending reasons: ``job_reason_string()`` in 22.05.8's ``slurm_protocol_defs.c`` and the
  ``jsra[]`` table of ``src/common/job_state_reason.c`` in 25.11 (union of both; the names only one
  side has are noted in ``REASON_SINCE``), and "JOB REASON CODES" of ``man squeue`` (22.05),
  which adds ``WaitingForScheduling``.

Kinds (the small enum ssflctl reasons with; the Slurm state name is always kept next to it):

=========== =================================================================================
queued      waiting to start; Slurm will start it by itself (PENDING, REQUEUED, CONFIGURING …)
held        will not start until someone releases it (REQUEUE_HOLD, SPECIAL_EXIT, RESV_DEL_HOLD,
            or PENDING with reason JobHeldUser/JobHeldAdmin/JobHoldMaxRequeue)
running     has an allocation and runs, or is finishing (RUNNING, COMPLETING, STAGE_OUT …)
suspended   has an allocation but does not run (SUSPENDED, STOPPED)
done        COMPLETED: every process exited 0
failed      FAILED (non-zero exit, a signal, a launch failure)
cancelled   CANCELLED (scancel by a user or an admin), REVOKED (federation: ran elsewhere)
preempted   PREEMPTED (terminated for a higher-priority job; with PreemptMode=REQUEUE Slurm
            requeues it and squeue/sacct show PENDING again, the PREEMPTED record stays in sacct -D)
timeout     TIMEOUT (time limit), DEADLINE (its --deadline passed)
node_fail   NODE_FAIL, BOOT_FAIL: the node failed, not the job (batch jobs are requeued unless
            --no-requeue; the NODE_FAIL record then stays in sacct -D)
oom         OUT_OF_MEMORY (Slurm saw the kernel's OOM killer; needs task/cgroup)
unknown     the scheduler's answer is not known (a failed query; see slurm_query), never a state
=========== =================================================================================
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, List, Optional, Tuple


class Kind(str, enum.Enum):
    QUEUED = "queued"
    HELD = "held"
    RUNNING = "running"
    SUSPENDED = "suspended"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PREEMPTED = "preempted"
    TIMEOUT = "timeout"
    NODE_FAIL = "node_fail"
    OOM = "oom"
    UNKNOWN = "unknown"

    def __str__(self) -> str:  # "queued", not "Kind.QUEUED"
        return self.value


#: kinds a job is in while it still has a future in the queue (not terminal)
ACTIVE_KINDS: FrozenSet[Kind] = frozenset({Kind.QUEUED, Kind.HELD, Kind.RUNNING, Kind.SUSPENDED})
#: terminal kinds that are not a success
FAILURE_KINDS: FrozenSet[Kind] = frozenset({Kind.FAILED, Kind.CANCELLED, Kind.PREEMPTED, Kind.TIMEOUT,
                                            Kind.NODE_FAIL, Kind.OOM})


class UnmappedState(ValueError):
    """A state (or reason, with ``strict``) Slurm printed that this table does not know: a newer
    Slurm than the tables were checked against; add it here rather than guess."""


@dataclass(frozen=True)
class State:
    name: str          # as sacct/squeue %T print it
    code: str          # compact form, squeue %t
    kind: Kind
    terminal: bool     # the job will not run again by itself (sacct's final word for this record)
    meaning: str
    hint: str = ""     # what to do, for held, special-exit and terminal states
    since: str = "22.05"


_RESUBMIT = "`ssflctl submit` again (the run resumes from its last checkpoint)"

_STATE_ROWS: Tuple[State, ...] = (
    # base states (enum job_states; sacct --helpstate prints exactly these)
    State("PENDING", "PD", Kind.QUEUED, False, "awaiting resource allocation; see the reason (squeue %r)"),
    State("RUNNING", "R", Kind.RUNNING, False, "has an allocation and runs"),
    State("SUSPENDED", "S", Kind.SUSPENDED, False,
          "has an allocation, but execution is suspended and its CPUs were released for other jobs",
          "`scontrol resume JOBID` (admin) or wait for the gang/preemption scheduler"),
    State("COMPLETED", "CD", Kind.DONE, True, "all processes on all nodes exited with code 0"),
    State("CANCELLED", "CA", Kind.CANCELLED, True,
          "cancelled by the user or an administrator (sacct: 'CANCELLED by UID'); may never have started",
          _RESUBMIT),
    State("FAILED", "F", Kind.FAILED, True, "terminated with a non-zero exit code or other failure condition",
          "read the job's log; ExitCode rc:signal tells exit code and signal; then " + _RESUBMIT),
    State("TIMEOUT", "TO", Kind.TIMEOUT, True, "terminated upon reaching its time limit",
          "raise resources.time, or " + _RESUBMIT),
    State("NODE_FAIL", "NF", Kind.NODE_FAIL, True,
          "terminated because one of its nodes failed (not the job's fault)",
          "nothing wrong in the run: " + _RESUBMIT + "; tell the admins if it repeats"),
    State("PREEMPTED", "PR", Kind.PREEMPTED, True,
          "terminated by preemption for a higher-priority job (PreemptMode=CANCEL; with REQUEUE it pends again)",
          _RESUBMIT + ", or use a QOS that is not preemptible"),
    State("BOOT_FAIL", "BF", Kind.NODE_FAIL, True,
          "terminated by a launch failure, typically hardware (a node could not boot), and could not be requeued",
          _RESUBMIT + "; tell the admins if it repeats"),
    State("DEADLINE", "DL", Kind.TIMEOUT, True, "terminated on its deadline (--deadline)",
          "submit with a later or no --deadline"),
    State("OUT_OF_MEMORY", "OOM", Kind.OOM, True, "experienced an out-of-memory error (the OOM killer)",
          "raise resources.mem (MaxRSS in sacct shows the peak), then " + _RESUBMIT),
    # state flags (job_state_string() tests these before the base state, so they are what is printed)
    State("COMPLETING", "CG", Kind.RUNNING, False,
          "finished; Slurm is still ending it (epilog, processes that do not exit)"),
    State("STAGE_OUT", "SO", Kind.RUNNING, False, "finished; staging out data (burst buffer)"),
    State("CONFIGURING", "CF", Kind.QUEUED, False, "allocated; its nodes are booting/being configured"),
    State("EXPEDITING", "EX", Kind.QUEUED, False, "being checked for an expedited requeue", since="25.11"),
    State("RESIZING", "RS", Kind.RUNNING, False, "its allocation is about to change size"),
    State("REQUEUED", "RQ", Kind.QUEUED, False, "requeued (preemption, node failure, scontrol requeue); pends again"),
    State("REQUEUE_FED", "RF", Kind.QUEUED, False, "being requeued by its federation"),
    State("REQUEUE_HOLD", "RH", Kind.HELD, False, "requeued and held (scontrol requeuehold)",
          "`scontrol release JOBID` lets it run again"),
    State("SPECIAL_EXIT", "SE", Kind.HELD, False,
          "exited with a code in RequeueExitHold (or scontrol requeuehold state=specialexit): requeued and held",
          "look at why it exited, then `scontrol release JOBID`, or `scancel JOBID` and " + _RESUBMIT),
    State("STOPPED", "ST", Kind.SUSPENDED, False, "stopped by SIGSTOP (scontrol suspend-like); keeps its CPUs",
          "`scancel --signal=CONT JOBID`"),
    State("REVOKED", "RV", Kind.CANCELLED, True,
          "federation: this sibling was removed because another cluster started the job",
          "look for the job on the cluster that started it (sacct -M all)"),
    State("RESV_DEL_HOLD", "RD", Kind.HELD, False, "held because its reservation was deleted",
          "`scontrol release JOBID` (it then runs outside the reservation), or resubmit"),
    State("SIGNALING", "SI", Kind.RUNNING, False, "an outgoing signal to the job is pending"),
)

#: every Slurm job state, by the name sacct / squeue %T print
STATES: Dict[str, State] = {s.name: s for s in _STATE_ROWS}
#: compact code (squeue %t) -> state name
STATE_CODES: Dict[str, str] = {s.code: s.name for s in _STATE_ROWS}


def base_state(text: str) -> str:
    """The state name in what sacct/squeue printed: 'CANCELLED by 0' -> 'CANCELLED', 'cd' -> 'COMPLETED',
    'running' -> 'RUNNING'. Empty for empty text."""
    word = (text or "").strip().split(" ")[0].rstrip("+").upper()  # sacct -X may append '+' (truncation)
    return STATE_CODES.get(word, word)


def state_info(text: str) -> State:
    """The table row of a state as sacct or squeue printed it; raises UnmappedState for a name not in
    the table (never guesses a kind)."""
    name = base_state(text)
    try:
        return STATES[name]
    except KeyError:
        raise UnmappedState(f"Slurm job state {text!r} is not in ssflctl's table "
                            f"(ssflctl/backends/slurm_states.py; known: {', '.join(STATES)})") from None


def kind_of(text: str) -> Kind:
    """Kind of a state (raises UnmappedState for an unknown one)."""
    return state_info(text).kind


def unmapped_states(names: Iterable[str]) -> List[str]:
    """The names (as printed by sacct/squeue --helpstate etc.) this table does not map."""
    return [n for n in names if n and base_state(n) not in STATES]


def states_of(*kinds: Kind) -> FrozenSet[str]:
    """State names of these kinds, e.g. states_of(Kind.QUEUED, Kind.HELD)."""
    return frozenset(s.name for s in _STATE_ROWS if s.kind in kinds)


# ------------------------------------------------------------------------------------------------
# pending reasons (squeue %r, sacct Reason)
# ------------------------------------------------------------------------------------------------

class Clears(str, enum.Enum):
    WAITING = "waiting"   # clears by waiting: other jobs end, time passes, a dependency finishes
    ADMIN = "admin"       # the cluster must change (node/partition back, usage reset): waiting may help
    NEVER = "never"       # never clears by waiting: the job (or a limit) must be changed
    ENDED = "ended"       # not a pending reason: why a job ended (NonZeroExitCode, TimeLimit …)
    HELD = "held"         # someone must release it

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Reason:
    name: str
    clears: Clears
    meaning: str
    hint: str = ""
    since: str = "22.05"

    @property
    def clears_by_waiting(self) -> bool:
        return self.clears is Clears.WAITING


#: every reason name of Slurm 22.05.8 and 25.11 (job_reason_string / jsra[]), plus the man page's
#: WaitingForScheduling
ALL_REASON_NAMES: Tuple[str, ...] = tuple("""
None WaitingForScheduling Prolog Priority Dependency Resources PartitionNodeLimit PartitionTimeLimit
PartitionDown PartitionInactive JobHeldAdmin JobHeldUser BeginTime Licenses AssociationJobLimit
AssociationResourceLimit AssociationTimeLimit Reservation ReqNodeNotAvail FrontEndDown SchedDefer NodeDown
BadConstraints SystemFailure JobLaunchFailure NonZeroExitCode TimeLimit InactiveLimit InvalidAccount
InvalidQOS QOSUsageThreshold QOSJobLimit QOSResourceLimit QOSTimeLimit BlockMaxError BlockFreeAction
Cleaning QOSNotAllowed AccountNotAllowed DependencyNeverSatisfied JobHoldMaxRequeue JobArrayTaskLimit
BurstBufferResources BurstBufferStageIn BurstBufferOperation PowerNotAvail PowerReserved DeadLine
OutOfMemory PartitionConfig AccountingPolicy FedJobLock ReservationDeleted MaxMemPerLimit
RaisedSignal ReservationInvalid Constraints MaxPoweredUpNodes MpiPortsBusy NvidiaImexChannels
QOSGrpCpuLimit QOSGrpCPUMinutesLimit QOSGrpCPURunMinutesLimit QOSGrpJobsLimit QOSGrpMemLimit
QOSGrpNodeLimit QOSGrpSubmitJobsLimit QOSGrpWallLimit QOSMaxCpuPerJobLimit QOSMaxCpuMinutesPerJobLimit
QOSMaxNodePerJobLimit QOSMaxWallDurationPerJobLimit QOSMaxCpuPerUserLimit QOSMaxJobsPerUserLimit
QOSMaxNodePerUserLimit QOSMaxSubmitJobPerUserLimit QOSMinCpuNotSatisfied
AssocGrpCpuLimit AssocGrpCPUMinutesLimit AssocGrpCPURunMinutesLimit AssocGrpJobsLimit AssocGrpMemLimit
AssocGrpNodeLimit AssocGrpSubmitJobsLimit AssocGrpWallLimit AssocMaxJobsLimit AssocMaxCpuPerJobLimit
AssocMaxCpuMinutesPerJobLimit AssocMaxNodePerJobLimit AssocMaxWallDurationPerJobLimit AssocMaxSubmitJobLimit
AssocGrpUnknown AssocGrpUnknownMinutes AssocGrpUnknownRunMinutes AssocMaxUnknownPerJob AssocMaxUnknownPerNode
AssocMaxUnknownMinutesPerJob AssocMaxCpuPerNode AssocGrpMemMinutes AssocGrpMemRunMinutes AssocMaxMemPerJob
AssocMaxMemPerNode AssocMaxMemMinutesPerJob AssocGrpNodeMinutes AssocGrpNodeRunMinutes
AssocMaxNodeMinutesPerJob AssocGrpEnergy AssocGrpEnergyMinutes AssocGrpEnergyRunMinutes AssocMaxEnergyPerJob
AssocMaxEnergyPerNode AssocMaxEnergyMinutesPerJob AssocGrpGRES AssocGrpGRESMinutes AssocGrpGRESRunMinutes
AssocMaxGRESPerJob AssocMaxGRESPerNode AssocMaxGRESMinutesPerJob AssocGrpLicense AssocGrpLicenseMinutes
AssocGrpLicenseRunMinutes AssocMaxLicensePerJob AssocMaxLicenseMinutesPerJob AssocGrpBB AssocGrpBBMinutes
AssocGrpBBRunMinutes AssocMaxBBPerJob AssocMaxBBPerNode AssocMaxBBMinutesPerJob AssocGrpBilling
AssocGrpBillingMinutes AssocGrpBillingRunMinutes AssocMaxBillingPerJob AssocMaxBillingPerNode
AssocMaxBillingMinutesPerJob
QOSGrpUnknown QOSGrpUnknownMinutes QOSGrpUnknownRunMinutes QOSMaxUnknownPerJob QOSMaxUnknownPerNode
QOSMaxUnknownPerUser QOSMaxUnknownMinutesPerJob QOSMinUnknown QOSMaxCpuPerNode QOSGrpMemoryMinutes
QOSGrpMemoryRunMinutes QOSMaxMemoryPerJob QOSMaxMemoryPerNode QOSMaxMemoryPerUser QOSMaxMemoryMinutesPerJob
QOSMinMemory QOSGrpNodeMinutes QOSGrpNodeRunMinutes QOSMaxNodeMinutesPerJob QOSMinNode QOSGrpEnergy
QOSGrpEnergyMinutes QOSGrpEnergyRunMinutes QOSMaxEnergyPerJob QOSMaxEnergyPerNode QOSMaxEnergyPerUser
QOSMaxEnergyMinutesPerJob QOSMinEnergy QOSGrpGRES QOSGrpGRESMinutes QOSGrpGRESRunMinutes QOSMaxGRESPerJob
QOSMaxGRESPerNode QOSMaxGRESPerUser QOSMaxGRESMinutesPerJob QOSMinGRES QOSGrpLicense QOSGrpLicenseMinutes
QOSGrpLicenseRunMinutes QOSMaxLicensePerJob QOSMaxLicensePerUser QOSMaxLicenseMinutesPerJob QOSMinLicense
QOSGrpBB QOSGrpBBMinutes QOSGrpBBRunMinutes QOSMaxBBPerJob QOSMaxBBPerNode QOSMaxBBPerUser QOSMinBB
QOSGrpBilling QOSGrpBillingMinutes QOSGrpBillingRunMinutes QOSMaxBillingPerJob QOSMaxBillingPerNode
QOSMaxBillingPerUser QOSMaxBillingMinutesPerJob QOSMinBilling
MaxBBPerAccount MaxBillingPerAccount MaxCpuPerAccount MaxEnergyPerAccount MaxGRESPerAccount MaxNodePerAccount
MaxLicensePerAccount MaxMemoryPerAccount MaxUnknownPerAccount MaxJobsPerAccount MaxSubmitJobsPerAccount
MaxBBRunMinsPerAccount MaxBillingRunMinsPerAccount MaxCpuRunMinsPerAccount MaxEnergyRunMinsPerAccount
MaxGRESRunMinsPerAccount MaxNodeRunMinsPerAccount MaxLicenseRunMinsPerAccount MaxMemoryRunMinsPerAccount
MaxUnknownRunMinsPerAccount MaxBBRunMinsPerUser MaxBillingRunMinsPerUser MaxCpuRunMinsPerUser
MaxEnergyRunMinsPerUser MaxGRESRunMinsPerUser MaxNodeRunMinsPerUser MaxLicenseRunMinsPerUser
MaxMemoryRunMinsPerUser MaxUnknownRunMinsPerUser
""".split())

#: reasons that not every supported version has (the rest are in 22.05.8 and 25.11 alike)
REASON_SINCE: Dict[str, str] = {
    "RaisedSignal": "23.02", "ReservationInvalid": "23.02", "Constraints": "23.11", "MaxPoweredUpNodes": "24.05",
    "MpiPortsBusy": "24.05", "NvidiaImexChannels": "25.11",
    **{n: "24.05" for n in ALL_REASON_NAMES if re.fullmatch(r"Max\w+RunMinsPer(Account|User)", n)},
}
#: reasons of 22.05 that later versions dropped (BlueGene / front-end / power-save leftovers)
REASON_UNTIL: Dict[str, str] = {n: "22.05" for n in
                                ("FrontEndDown", "BlockMaxError", "BlockFreeAction", "PowerNotAvail", "PowerReserved")}

_WAIT_OTHERS = "wait: it starts when jobs ahead of it end"
_FIX_REQUEST = "`scancel JOBID`, then submit with a request within the limit (resources/qos/partition in the experiment)"

_REASON_ROWS: Tuple[Reason, ...] = (
    Reason("None", Clears.WAITING, "no reason set (yet): the scheduler has not looked at it, or it runs"),
    Reason("WaitingForScheduling", Clears.WAITING, "no reason set yet; the scheduler has not looked at it"),
    Reason("Priority", Clears.WAITING, "jobs of higher priority are ahead of it in the partition", _WAIT_OTHERS),
    Reason("Resources", Clears.WAITING, "waiting for resources (CPUs, memory, GPUs) to become free", _WAIT_OTHERS),
    Reason("Dependency", Clears.WAITING, "waits for a job it depends on (e.g. afterok) to finish",
           "wait for the job it depends on"),
    Reason("DependencyNeverSatisfied", Clears.NEVER,
           "the job it depends on ended in a way that can never satisfy the dependency (e.g. afterok on a failed job)",
           "`scancel JOBID` and " + _RESUBMIT),
    Reason("BeginTime", Clears.WAITING,
           "its earliest start time has not come (--begin, or the short delay after a requeue)", "wait"),
    Reason("Prolog", Clears.WAITING, "its prolog is still running"),
    Reason("Cleaning", Clears.WAITING, "being requeued; still cleaning up from its previous run", "wait"),
    Reason("Licenses", Clears.WAITING, "waiting for a license", _WAIT_OTHERS),
    Reason("Reservation", Clears.WAITING, "waiting for its advanced reservation to become available", "wait"),
    Reason("ReservationDeleted", Clears.NEVER, "its reservation was deleted",
           "`scontrol release JOBID` if held (runs outside the reservation), else resubmit without --reservation"),
    Reason("ReservationInvalid", Clears.NEVER, "its reservation is not usable by it",
           "resubmit with another (or no) --reservation", "23.02"),
    Reason("JobArrayTaskLimit", Clears.WAITING, "its array's %N throttle: N tasks already run",
           "wait (or `scontrol update JobId=JOBID ArrayTaskThrottle=N`)"),
    Reason("SchedDefer", Clears.WAITING, "the scheduler deferred it (SchedulerParameters=defer)", "wait"),
    Reason("FedJobLock", Clears.WAITING, "federation: waiting for its sibling clusters to agree", "wait"),
    Reason("MaxPoweredUpNodes", Clears.WAITING, "power saving: too many nodes are powered up", "wait", "24.05"),
    Reason("MpiPortsBusy", Clears.WAITING, "all MPI reserved ports are in use", _WAIT_OTHERS, "24.05"),
    Reason("NvidiaImexChannels", Clears.WAITING, "waiting for NVIDIA IMEX channels", _WAIT_OTHERS, "25.11"),
    Reason("PowerNotAvail", Clears.WAITING, "power capping: not enough power available", "wait"),
    Reason("PowerReserved", Clears.WAITING, "power capping: power is reserved for other jobs", "wait"),
    Reason("BurstBufferResources", Clears.WAITING, "waiting for burst buffer resources", _WAIT_OTHERS),
    Reason("BurstBufferStageIn", Clears.WAITING, "staging in its burst buffer data", "wait"),
    Reason("BurstBufferOperation", Clears.ADMIN, "a burst buffer operation failed", "tell the admins"),
    # held
    Reason("JobHeldUser", Clears.HELD, "held by its user (sbatch --hold, scontrol hold/uhold)",
           "`scontrol release JOBID`"),
    Reason("JobHeldAdmin", Clears.HELD,
           "held by an administrator or root (scontrol hold as admin; also a launch failure's requeue-hold)",
           "ask an admin, who can `scontrol release JOBID`"),
    Reason("JobHoldMaxRequeue", Clears.HELD, "held after being requeued more often than MaxBatchRequeue",
           "find why it keeps being requeued, then `scontrol release JOBID` or `scancel JOBID`"),
    # the cluster must change
    Reason("PartitionDown", Clears.ADMIN, "its partition is DOWN",
           "wait for the admins to bring it up, or `scontrol update JobId=JOBID Partition=OTHER`"),
    Reason("PartitionInactive", Clears.ADMIN, "its partition is INACTIVE (starts no jobs)",
           "wait for the admins, or move it to another partition"),
    Reason("ReqNodeNotAvail", Clears.ADMIN,
           "a node it requires is not available (in use, reserved, DOWN, DRAINED or not responding; "
           "squeue adds ', UnavailableNodes:…')",
           "wait for the node, or resubmit without --nodelist/--exclude that pin it"),
    Reason("NodeDown", Clears.ADMIN, "a node it requires is DOWN", "wait for the admins to return it"),
    Reason("FrontEndDown", Clears.ADMIN, "no front end node is available", "wait for the admins"),
    Reason("BlockMaxError", Clears.ADMIN, "BlueGene block error (obsolete)", "tell the admins"),
    Reason("BlockFreeAction", Clears.ADMIN, "BlueGene block being freed (obsolete)", "wait"),
    Reason("QOSUsageThreshold", Clears.ADMIN, "its QOS's usage threshold is breached (UsageThreshold)",
           "wait for usage to decay, or use another QOS"),
    Reason("AccountingPolicy", Clears.WAITING, "an accounting policy limit holds it", _WAIT_OTHERS),
    # the job itself must change
    Reason("PartitionNodeLimit", Clears.NEVER,
           "its node count is outside its partition's limits (or required nodes are DOWN/DRAINED)", _FIX_REQUEST),
    Reason("PartitionTimeLimit", Clears.NEVER, "its time limit exceeds its partition's MaxTime",
           "`scontrol update JobId=JOBID TimeLimit=…` within the partition's MaxTime, or resubmit"),
    Reason("PartitionConfig", Clears.NEVER, "its request does not fit its partition's configuration", _FIX_REQUEST),
    Reason("BadConstraints", Clears.NEVER, "its constraints (--constraint, resources) can never be satisfied",
           _FIX_REQUEST),
    Reason("Constraints", Clears.NEVER, "its constraints can not be satisfied", _FIX_REQUEST, "23.11"),
    Reason("InvalidAccount", Clears.NEVER, "its account is invalid (unknown, or the user is not in it)",
           "resubmit with an account you belong to (`sacctmgr show assoc user=$USER`)"),
    Reason("InvalidQOS", Clears.NEVER, "its QOS is invalid for it",
           "resubmit with a QOS you may use (`sacctmgr show assoc user=$USER format=qos`)"),
    Reason("QOSNotAllowed", Clears.NEVER, "its QOS is not allowed in its partition or association", _FIX_REQUEST),
    Reason("AccountNotAllowed", Clears.NEVER, "its account is not allowed in its partition", _FIX_REQUEST),
    Reason("MaxMemPerLimit", Clears.NEVER, "it asks for more memory per CPU/node than MaxMemPer* allows",
           _FIX_REQUEST),
    # why a job ended (sacct Reason, squeue %r of a finished job)
    Reason("NonZeroExitCode", Clears.ENDED, "it exited with a non-zero code"),
    Reason("RaisedSignal", Clears.ENDED, "it was killed by a signal", since="23.02"),
    Reason("TimeLimit", Clears.ENDED, "it reached its time limit"),
    Reason("InactiveLimit", Clears.ENDED, "it reached the system's InactiveLimit"),
    Reason("SystemFailure", Clears.ENDED, "a failure of Slurm, a file system, the network …"),
    Reason("JobLaunchFailure", Clears.ENDED,
           "it could not be launched (file system, program name …; 22.05 also reports a batch script killed by a signal so)"),
    Reason("DeadLine", Clears.ENDED, "its deadline (--deadline) passed"),
    Reason("OutOfMemory", Clears.ENDED, "it ran out of memory"),
)

_FAMILY_RES = r"(Cpu|CPU|Mem|Memory|Node|Energy|GRES|License|BB|Billing|Unknown|Jobs|Wall|SubmitJobs?)"


def _family(name: str) -> Optional[Reason]:
    """A QOS/association/account limit, by the naming rules of job_state_reason.c: Grp* is an aggregate
    over all jobs of the QOS/association (clears when they end), except Grp*Minutes (not RunMinutes)
    and GrpWall, usage totals that only decay or are reset; Max*PerUser/PerAccount and *RunMins* count the user's
    or account's running jobs (clear when they end); Max*PerJob/PerNode/MinutesPerJob and Min* are
    per-job limits this job's own request violates (never clear)."""
    scope = "QOS" if name.startswith("QOS") else "association" if name.startswith("Assoc") else "account/user"
    if (re.fullmatch(r"(QOS|Assoc)Grp\w*Minutes(Limit)?", name) and "RunMinutes" not in name) \
            or re.fullmatch(r"(QOS|Assoc)GrpWallLimit", name):
        return Reason(name, Clears.ADMIN, f"its {scope} used up an aggregate usage limit (GrpTRESMins/GrpWall)",
                      "wait for usage to decay or be reset by the admins, or use another QOS/account")
    if re.fullmatch(r"(QOS|Assoc)Grp\w+", name) or name in ("QOSJobLimit", "QOSResourceLimit", "QOSTimeLimit",
                                                            "AssociationJobLimit", "AssociationResourceLimit",
                                                            "AssociationTimeLimit", "AssocMaxJobsLimit"):
        return Reason(name, Clears.WAITING, f"its {scope} reached an aggregate limit on running jobs/resources",
                      "wait: it starts when other jobs of the same " + scope + " end")
    if re.fullmatch(r"(QOS|Assoc)MaxSubmitJobs?(PerUser)?Limit|AssocMaxSubmitJobLimit|MaxSubmitJobsPerAccount", name):
        return Reason(name, Clears.WAITING, f"its {scope} has as many jobs queued as it may submit",
                      "wait for queued jobs to end")
    if re.fullmatch(r"QOSMax\w+PerUser(Limit)?|Max\w+PerAccount|Max\w+RunMinsPerUser", name):
        return Reason(name, Clears.WAITING,
                      f"the user's/account's running jobs reached a {scope} limit ({name})",
                      "wait: it starts when the user's other jobs in that QOS/account end")
    if re.fullmatch(r"(QOS|Assoc)Max\w+(PerJob|PerNode|MinutesPerJob)(Limit)?|QOSMaxCpuPerNode|AssocMaxCpuPerNode",
                    name) or re.fullmatch(r"QOSMin\w+", name):
        return Reason(name, Clears.NEVER, f"the job's own request violates a per-job {scope} limit ({name})",
                      _FIX_REQUEST)
    return None


def _build_reasons() -> Dict[str, Reason]:
    out = {r.name: r for r in _REASON_ROWS}
    for n in ALL_REASON_NAMES:
        if n not in out:
            fam = _family(n)
            if fam is not None:
                out[n] = Reason(fam.name, fam.clears, fam.meaning, fam.hint, REASON_SINCE.get(n, "22.05"))
    return out


#: every pending reason, by name (the word squeue %r / sacct Reason print)
REASONS: Dict[str, Reason] = _build_reasons()


def reason_info(text: str, strict: bool = False) -> Reason:
    """The table row of a reason as squeue %r / sacct Reason print it. squeue prints the job's
    state_desc instead when Slurm set one ("ReqNodeNotAvail, UnavailableNodes:n1"); its first word
    decides. A text this table does not know: with ``strict`` UnmappedState, otherwise a Reason of
    Clears.ADMIN that names the text as unknown (it is reported, never guessed to clear)."""
    raw = (text or "").strip().strip("()")
    head = re.split(r"[,\s]", raw, maxsplit=1)[0] if raw else "None"
    if head in REASONS:
        return REASONS[head]
    if strict:
        raise UnmappedState(f"Slurm pending reason {text!r} is not in ssflctl's table "
                            "(ssflctl/backends/slurm_states.py)")
    return Reason(raw, Clears.ADMIN, f"a reason ssflctl does not know: {raw!r}",
                  "see `scontrol show job JOBID` (Reason=…)")


def unmapped_reasons(names: Iterable[str]) -> List[str]:
    """Names (or man-page patterns such as 'QOSGrp*Limit') this table does not map."""
    out = []
    for n in names:
        if "*" in n:
            rx = re.compile(re.escape(n).replace(r"\*", r"\w+") + "$")
            if not any(rx.match(k) for k in REASONS):
                out.append(n)
        elif n and n not in REASONS:
            out.append(n)
    return out


# ------------------------------------------------------------------------------------------------
# state + reason together
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    state: str                 # Slurm's name (base_state)
    kind: Kind
    reason: Optional[Reason]   # for PENDING (and held) jobs
    stuck: bool                # pending and will not start by waiting alone
    meaning: str
    hint: str

    def line(self, job_id: str = "JOBID") -> str:
        """One line for `ssflctl status`: 'held (PENDING, JobHeldUser): … — scontrol release 12'."""
        why = f"{self.state}, {self.reason.name}" if self.reason and self.reason.name != "None" else self.state
        out = f"{self.kind} ({why}): {self.meaning}"
        if self.hint:
            out += " — " + self.hint.replace("JOBID", str(job_id))
        return out


def classify(state: str, reason: str = "") -> Verdict:
    """Kind of a job from its state and (for PENDING) its reason. A held reason makes a PENDING job
    HELD; a reason that never clears by waiting marks it ``stuck``. Raises UnmappedState for an
    unknown state; an unknown reason is kept and reported as such (stuck, Clears.ADMIN)."""
    st = state_info(state)
    kind, meaning, hint, rsn, stuck = st.kind, st.meaning, st.hint, None, False
    if st.name == "PENDING" or (st.kind is Kind.HELD and reason):
        rsn = reason_info(reason)
        if rsn.clears is Clears.HELD:
            kind, stuck = Kind.HELD, True
        elif rsn.clears in (Clears.NEVER, Clears.ADMIN):
            stuck = True
        if st.name == "PENDING" and rsn.name != "None":
            meaning, hint = rsn.meaning, rsn.hint
    return Verdict(st.name, kind, rsn, stuck, meaning, hint)
