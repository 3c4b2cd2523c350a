"""`NPROC_PER_NODE=4 gkd-train ...` starts its processes itself, as ms-swift's `swift rlhf` does.

ms-swift users launch multi-process runs by setting NPROC_PER_NODE (and NNODES, NODE_RANK, MASTER_ADDR,
MASTER_PORT for several machines) in front of the command; it then runs itself under torchrun. gkd-train
and gkd-infer do the same, so those habits carry over. A process that torchrun (or accelerate) started
already has LOCAL_RANK set and runs as it is.
"""

import atexit
import os
import shlex
import sys

from gkd.errors import GKDUserError

# Environment variable -> torchrun flag, in ms-swift's order.
TORCHRUN_VARIABLES = (("NPROC_PER_NODE", "--nproc_per_node"), ("MASTER_PORT", "--master_port"),
                      ("NNODES", "--nnodes"), ("NODE_RANK", "--node_rank"), ("MASTER_ADDR", "--master_addr"))
INTEGER_VARIABLES = {"NPROC_PER_NODE": 1, "MASTER_PORT": 1, "NNODES": 1, "NODE_RANK": 0}  # name -> smallest


def torchrun_arguments(module: str, argv: list[str]) -> list[str] | None:
    """torchrun's arguments that run `module` with argv in several processes, or None when this process
    should run as it is (no NPROC_PER_NODE / NNODES, or already started by a launcher)."""
    if "LOCAL_RANK" in os.environ or not (os.environ.get("NPROC_PER_NODE") or os.environ.get("NNODES")):
        return None
    flags = []
    for variable, flag in TORCHRUN_VARIABLES:
        value = os.environ.get(variable)
        if not value:
            continue
        if variable in INTEGER_VARIABLES and not (value.isdigit() and int(value) >= INTEGER_VARIABLES[variable]):
            raise GKDUserError(f"{variable}={value}: must be an integer >= {INTEGER_VARIABLES[variable]}")
        flags += [flag, value]
    return [*flags, "-m", module, *argv]


def torchrun_command(module: str, argv: list[str]) -> list[str] | None:
    """The same as a command line, as ms-swift prints it."""
    arguments = torchrun_arguments(module, argv)
    return None if arguments is None else [sys.executable, "-m", "torch.distributed.run", *arguments]


def run_under_torchrun_if_asked(module: str, argv: list[str] | None, program: str) -> None:
    """Re-run this command under torchrun when NPROC_PER_NODE or NNODES asks for it; exit with its code.

    torchrun runs in this process: when a process fails, its own one-line error is what the user reads,
    not torchrun's report (a traceback of the launcher, naming the ranks and exit codes)."""
    try:
        arguments = torchrun_arguments(module, sys.argv[1:] if argv is None else list(argv))
    except GKDUserError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        sys.exit(2)
    if arguments is None:
        return
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    print(f"{program}: running {shlex.join(torchrun_command(module, arguments[arguments.index('-m') + 2:]))}",
          file=sys.stderr)
    try:
        run(parse_args(arguments))
    except ChildFailedError as failure:
        codes = sorted({error.exitcode for error in failure.failures.values()})
        sys.exit(codes[-1] if codes and codes[-1] > 0 else 1)
    except KeyboardInterrupt:  # torchrun got the same Ctrl-C and stops its processes
        sys.exit(130)
    sys.exit(0)


def leave_finished_processes(state) -> None:
    """Ends each process of a multi-process run whose work is all written: the processes wait for each other,
    then leave without the interpreter's teardown. Native libraries' teardown at interpreter exit (gloo's
    process group, DeepSpeed's shared-memory ops) can abort a process ("terminate called without an active
    exception", exit -6) after everything was saved, and torchrun then reports the finished run as failed;
    tearing the process group down first made that rarer, not impossible. Python's exit handlers (logging,
    wandb, TensorBoard) still run. `state`: accelerate's PartialState, or anything with its two members."""
    if state.num_processes <= 1:
        return
    state.wait_for_everyone()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
