"""Run coconut.py or latro.py as `python <script> <args>` would, inside the test process.

A subprocess pays for a new interpreter and the torch + transformers import (~3-4 s on a CI core)
before the script does anything; most script tests then train a tiny model for well under a second.
runpy executes the same file as `__main__` with sys.argv set, so the run takes exactly the path it
takes from the shell. What a real process would undo at exit is undone here after each run: the
out_dir lock is released, the Ctrl-C/SIGTERM handlers and sys.excepthook are put back, and the
global torch RNG and thread count are restored, so that runs do not leak into each other or into
other tests.

What only a real process shows stays in subprocess tests: signals (SIGKILL, SIGTERM), torchrun, exit
statuses and the one-line `error: ...` on stderr (tests/test_bad_inputs.py ONE_LINE_CASES).
"""
import contextlib
import dataclasses
import io
import os
import runpy
import signal
import sys

import torch

import checkpoints
import configurator
from configurator import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the tiny Coconut run the script tests share: ProsQA-style symbolic graphs of 6-8 nodes and 1-2
# hops (16 train, 4 val, 4 test questions), a 1-layer 32-dim GPT-2 from scratch, batches of 8 in
# micro-batches of 4, one latent stage
COCONUT_TINY = ["config/coconut_prosqa_small.py",
                "--task_options={'symbolic': True, 'min_nodes': 6, 'max_nodes': 8, 'min_hops': 1, "
                "'max_hops': 2}", "--n_train=16", "--n_val=4", "--n_test=4", "--n_layer=1",
                "--n_head=2", "--n_embd=32", "--batch_size=8", "--micro_batch_size=4",
                "--max_latent_stage=1", "--max_new_tokens=4", "--probe=0"]


@dataclasses.dataclass
class Run:
    # the exit status the process would have: 0, 1 for a UserError, sys.exit's code
    code: int
    out: str                # everything the script printed
    error: UserError = None  # the UserError that ended the run, if one did

    # the same run read as a finished subprocess.run(...): a UserError is `error: ...` on stderr
    @property
    def returncode(self):
        return self.code

    @property
    def stdout(self):
        return self.out

    @property
    def stderr(self):
        return f"error: {self.error}\n" if self.error else ""


def run_main(script, args, cwd=ROOT):
    """Run ROOT/script with args (a list of '--key=value' and config files) in this process, from
    directory cwd (the repository, as the subprocess tests run it)."""
    path = os.path.join(ROOT, script)
    locks, prepare = [], checkpoints.prepare_out_dir

    def tracked(*a, **k):  # run.Run looks prepare_out_dir up in checkpoints' globals: this one
        locks.append(prepare(*a, **k))
        return locks[-1]

    saved = dict(argv=sys.argv, excepthook=sys.excepthook, cwd=os.getcwd(),
                 handlers={s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)})
    out, code, error = io.StringIO(), 0, None
    checkpoints.prepare_out_dir, sys.argv = tracked, [path, *map(str, args)]
    os.chdir(cwd)
    # one thread, as the subprocess tests run (OMP_NUM_THREADS=1): a CPU matmul split over another
    # number of threads may round differently, and tests compare these runs with subprocess runs bit
    # for bit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
    except UserError as e:
        code, error = 1, e
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        checkpoints.prepare_out_dir, sys.argv = prepare, saved["argv"]
        sys.excepthook = saved["excepthook"]
        os.chdir(saved["cwd"])
        torch.set_num_threads(threads)
        for sig, handler in saved["handlers"].items():
            signal.signal(sig, handler)
        for lock in locks:
            lock.release()
    return Run(code, out.getvalue(), error)


def check_rules_of(script, cfg, world_size=1):
    """configurator.run_checks with a script module's CHOICES, BOUNDS, NOTES and check_config for
    the configuration cfg (the script's defaults where cfg has no value), as a torchrun launch of
    world_size processes would check them."""
    defaults = {k: v for k, v in vars(script).items()
                if not k.startswith("_") and isinstance(v, configurator.TYPES)}
    configurator.run_checks({**defaults, **cfg}, world_size, world_size > 1,
                            choices=script.CHOICES, bounds=script.BOUNDS,
                            notes=getattr(script, "NOTES", None), check=script.check_config,
                            script=f"{script.__name__}.py",
                            own_checkpoints=script.__name__ == "coconut")
