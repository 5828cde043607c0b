"""checkpoints.py, parallel.py, run.py: checkpoint writes that survive interruption, out_dir
rules, the stop flag, the cross-rank helpers."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from configurator import UserError
from model import load_model
from checkpoints import (check_same_run, load_checkpoint, nonfinite_names, prepare_out_dir,
                         save_checkpoint)
from run import StopRequest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(arch):
    torch.manual_seed(0)
    return load_model("scratch", 40, arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=64)


def test_checkpoint_atomic_and_corrupt(tmp_path):
    path = str(tmp_path / "out" / "ckpt.pt")
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "step": 7, "config": {"lr": 1e-4}})
    ck = load_checkpoint(path)
    assert ck["step"] == 7 and torch.equal(ck["model"]["w"], torch.ones(3))
    assert not (tmp_path / "out" / "ckpt.pt.tmp").exists()
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])  # a crash mid-copy
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))



def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"step": 1})
    real_save = torch.save

    def save_half_then_die(obj, f):  # a kill or a full disk mid-write
        real_save(obj, f)
        f.truncate(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # the partial temporary file is gone

def test_leftover_temp_file_is_harmless_and_cleaned_by_prepare_out_dir(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"step": 1})
    # a SIGKILL mid-write, long ago
    (tmp_path / "ckpt.pt.tmp.12345").write_bytes(b"half a checkpoint")
    save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path)["step"] == 2
    lock = prepare_out_dir(str(tmp_path), resume=True)
    lock.release()
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "run.lock"]

WRITER = """
import os, sys, time, torch
from checkpoints import save_checkpoint
path, who = sys.argv[1], sys.argv[2]
open(f"{path}.ready.{who}", "w").close()
while not os.path.exists(f"{path}.go"):  # both writers start together, after their imports
    time.sleep(0.01)
for i in range(20):
    save_checkpoint(path, {"w": torch.full((20000,), float(i)), "who": who})
"""

def test_two_processes_writing_one_path_do_not_crash_each_other(tmp_path):
    # with one shared temporary name, a writer's rename took the other's half-written file or
    # found none
    path = str(tmp_path / "ckpt.pt")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, path, who], env=env,
                              stderr=subprocess.PIPE) for who in ("a", "b")]
    while not all(os.path.exists(f"{path}.ready.{who}") for who in ("a", "b")):
        assert all(p.poll() is None for p in procs), "a writer died before writing"
        time.sleep(0.01)
    open(f"{path}.go", "w").close()
    errors = [p.communicate()[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    ck = load_checkpoint(path)
    assert ck["who"] in ("a", "b") and torch.equal(ck["w"], torch.full((20000,), 19.0))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt.pt.go", "ckpt.pt.ready.a",
                                            "ckpt.pt.ready.b"]  # no temporary file left

def test_out_dir_that_is_a_file_or_unwritable_is_refused_before_work(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(UserError, match=r"out_dir '.*out' is a file, not a directory"):
        prepare_out_dir(str(f), resume=False)
    with pytest.raises(UserError, match=r"out_dir '.*out/run' cannot be written"):
        prepare_out_dir(str(f / "run"), resume=False)  # a directory that cannot be created

def test_a_scratch_run_refuses_an_out_dir_with_an_earlier_run(tmp_path, capsys):
    out = str(tmp_path)
    save_checkpoint(os.path.join(out, "ckpt.pt"), {"step": 5})
    save_checkpoint(os.path.join(out, "best.pt"), {"step": 4})
    with pytest.raises(UserError, match=r"holds ckpt.pt and best.pt of an earlier run: continue "
                                        r"it with --init_from=resume, start over with "
                                        r"--overwrite=True"):
        prepare_out_dir(out, resume=False)
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 5  # nothing was touched
    lock = prepare_out_dir(out, resume=True)  # the lock of the refused call was released
    lock.release()
    assert {"ckpt.pt", "best.pt"} <= set(os.listdir(out))  # resuming keeps the run's best.pt
    os.remove(os.path.join(out, "ckpt.pt"))
    with pytest.raises(UserError, match=r"holds best.pt of an earlier run: start over"):
        prepare_out_dir(out, resume=False)
    with pytest.raises(UserError, match=r"init_from='resume' but out_dir .* has no ckpt.pt"):
        prepare_out_dir(out, resume=True)
    lock = prepare_out_dir(out, resume=False, overwrite=True)
    lock.release()
    # no stale best.pt beside the new run's checkpoints
    assert sorted(os.listdir(out)) == ["run.lock"]
    assert "removed" in capsys.readouterr().out

def test_epoch_checkpoints_of_an_earlier_run_are_refused_or_removed(tmp_path, capsys,
                                                                     monkeypatch):
    # coconut.py's keep_epoch_checkpoints files belong to their run: a new run in the same
    # out_dir refuses them (a stale epoch_6.pt could start the next stage), --overwrite deletes
    # them; resuming keeps them; the disk check counts them
    import checkpoints
    import preflight
    out = str(tmp_path)
    for n in (1, 2):
        save_checkpoint(checkpoints.epoch_path(out, n), {"epoch": n - 1})
    (tmp_path / "epoch_notes.pt").write_text("x")                   # not one of them
    with pytest.raises(UserError, match=r"holds 2 epoch_N.pt of an earlier run: start over"):
        prepare_out_dir(out, resume=False)
    prepare_out_dir(out, resume=False, overwrite=True).release()
    assert sorted(os.listdir(out)) == ["epoch_notes.pt", "run.lock"]
    assert "removed" in capsys.readouterr().out
    free = 2 * 12 * 1000 + 4 * 1000 * 3                  # ckpt.pt twice, best.pt, 2 epoch files
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda _: type("U", (), {"free": free}))
    preflight.check_disk(out, 1000, False, extra_weights=2)
    with pytest.raises(UserError, match=r"best.pt, and 3 epoch_N.pt\): free space"):
        preflight.check_disk(out, 1000, False, extra_weights=3)

HOLDER = """
import sys, time
from checkpoints import prepare_out_dir
prepare_out_dir(sys.argv[1], resume=False)
print("locked", flush=True)
time.sleep(60)
"""

def test_out_dir_lock_names_the_live_holder_and_a_dead_ones_lock_is_taken_over(tmp_path):
    out = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, out], env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        message = rf"'{out}' is in use by another run \(pid {holder.pid} on "
        with pytest.raises(UserError, match=message):
            prepare_out_dir(out, resume=False)
    finally:
        holder.kill()  # SIGKILL: no exit handler runs, the lock file still names the dead pid
        holder.wait()
    lock = prepare_out_dir(out, resume=False)
    assert open(os.path.join(out, "run.lock")).read().split()[0] == str(os.getpid())
    with pytest.raises(UserError, match=rf"in use by another run \(pid {os.getpid()} on "):
        prepare_out_dir(out, resume=False)  # a second run from this very process is refused too
    lock.release()
    prepare_out_dir(out, resume=False).release()

def test_stop_request_sets_a_flag_and_a_second_signal_acts_at_once():
    # Python's own Ctrl-C handler to start from, also when the runner started us with SIGINT ignored
    # (a background job of a non-interactive shell is), where a second Ctrl-C could not interrupt
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.getsignal(signal.SIGINT)
    stop = StopRequest()
    try:
        assert not stop.requested()
        # Python runs a signal's handler in the main thread at its next check, which may come a
        # moment after os.kill returns (the kernel can deliver the signal to another of torch's
        # threads): sleep, which the signal interrupts, until it has run
        os.kill(os.getpid(), signal.SIGTERM)  # preemption: the run goes on to the end of its step
        for _ in range(500):
            if stop.requested():
                break
            time.sleep(0.01)
        assert stop.requested() and stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # asked twice: Python's own Ctrl-C behaviour
            for _ in range(500):
                time.sleep(0.01)
        assert signal.getsignal(signal.SIGINT) is before  # the earlier handlers are back
    finally:
        stop.restore()
        signal.signal(signal.SIGINT, outer)

STOP_DRIVER = """
import os, signal
import torch
import torch.distributed as dist
from parallel import all_sum, end_distributed, ranks_identical
from run import StopRequest
dist.init_process_group("gloo")
rank = dist.get_rank()
stop = StopRequest()
steps = 0
for step in range(1000):
    if rank == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGTERM)  # preemption reaches one rank only
    if stop.requested():
        break
    steps += 1
print(f"rank {rank}: {steps} steps, own signal {stop.signum}", flush=True)
# the cross-rank helpers: a sum over ranks; the same weights on both ranks, then one weight 1e-6
# apart
torch.manual_seed(0)
layer = torch.nn.Linear(3, 2)
same = ranks_identical(layer)
with torch.no_grad():
    layer.weight[1, 2] += 1e-6 * rank
print(f"rank {rank}: sum {all_sum(torch.tensor([rank + 1.0])).item()}, identical {same} "
      f"{ranks_identical(layer)}", flush=True)
end_distributed()
"""

def test_stop_request_stops_every_rank_at_the_same_step_and_the_cross_rank_helpers(tmp_path):
    # under DDP a rank that stops alone would leave the others waiting in their next all-reduce
    driver = tmp_path / "driver.py"
    driver.write_text(STOP_DRIVER)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(driver)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # the two ranks share one stdout pipe, so their lines can interleave: find the reports, not
    # lines
    reports = sorted(re.findall(r"rank (\d): (\d+) steps, own signal (None|\d+)", r.stdout))
    assert reports == [("0", "3", "None"), ("1", "3", "15")], r.stdout
    # parallel.all_sum and parallel.ranks_identical, as both scripts use them, then end_distributed
    helpers = sorted(re.findall(r"rank (\d): sum (\d+\.\d+), identical (True|False) (True|False)",
                                r.stdout))
    assert helpers == [("0", "3.0", "True", "False"), ("1", "3.0", "True", "False")], r.stdout

def test_check_same_run_names_every_differing_key():
    saved = {"task": "prosqa", "n_layer": 2, "seed": 0, "lr": 1e-4}
    check_same_run(saved, {**saved, "lr": 3e-4}, ("task", "n_layer", "seed"))  # lr may change
    message = r"other settings \(n_layer: checkpoint 2, now 4; seed: checkpoint <absent>, now 1\)"
    with pytest.raises(UserError, match=message):
        now = {"task": "prosqa", "n_layer": 4, "seed": 1}
        check_same_run({"task": "prosqa", "n_layer": 2}, now, ("task", "n_layer", "seed"))

def test_nonfinite_names_finds_nan_and_inf_but_not_integer_tensors():
    m = tiny("gpt2")
    assert nonfinite_names(m.named_parameters()) == []
    with torch.no_grad():
        m.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
        m.lm_head.weight[1, 1] = float("inf")  # tied to the input embedding
    named = list(m.named_parameters()) + [("rng", torch.get_rng_state())]
    assert nonfinite_names(named) == ["transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight"]
