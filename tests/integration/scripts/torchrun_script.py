"""An unchanged torchrun-style script: reads torchrun's environment, all-reduces over gloo.

Options (argv): --fail-rank R --code C (rank R exits with C after printing; through os._exit:
with a live gloo group, sys.exit may end in SIGABRT from gloo's destructors under load instead), --sleep S (others
sleep), --kill-rank R (rank R kills itself with SIGKILL), --fail-once FILE (fail only while FILE
does not exist; creates it), --marker M (ignored; makes the processes findable by tests),
--on-usr1 (print GOT USR1 and exit 0 at SIGUSR1), --keep-on-usr1 (a handler of its own that
prints GOT USR1 and returns: the script keeps running; it prints DONE at its end).
"""

import argparse
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


parser = argparse.ArgumentParser()
parser.add_argument("--fail-rank", type=int, default=-1)
parser.add_argument("--code", type=int, default=1)
parser.add_argument("--kill-rank", type=int, default=-1)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--fail-once", default="")
parser.add_argument("--marker", default="")
parser.add_argument("--on-usr1", action="store_true", help="print GOT USR1 and exit 0 on SIGUSR1")
parser.add_argument("--keep-on-usr1", action="store_true", help="print GOT USR1 on SIGUSR1, go on")
args = parser.parse_args()

if args.on_usr1:
    def _usr1(signum, frame):
        print("GOT USR1", flush=True)
        os._exit(0)

    signal.signal(signal.SIGUSR1, _usr1)
if args.keep_on_usr1:
    signal.signal(signal.SIGUSR1, lambda signum, frame: print("GOT USR1", flush=True))

names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
         "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "OMP_NUM_THREADS"]
print("ENV " + json.dumps({n: os.environ.get(n) for n in names}))

dist.init_process_group("gloo")
rank = dist.get_rank()
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
print(f"ALLREDUCE {value.item():g}")
print(f"to stderr from {rank}", file=sys.stderr)

if args.fail_once and rank == args.fail_rank and not os.path.exists(args.fail_once):
    open(args.fail_once, "w").close()
    print(f"failing once at {time.time():.3f}")
    _exit(args.code)
if rank == args.fail_rank and not args.fail_once:
    time.sleep(0.5)
    print(f"EXITING {args.code} at {time.time():.3f}")
    _exit(args.code)
if rank == args.kill_rank:
    time.sleep(0.5)
    print(f"KILLING myself at {time.time():.3f}")
    os.kill(os.getpid(), signal.SIGKILL)
if args.sleep:
    print("SLEEPING")
    time.sleep(args.sleep)
dist.barrier()
dist.destroy_process_group()
print("DONE")
