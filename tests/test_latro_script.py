"""latro.py end to end under interruption and failure: kills at several moments (SIGKILL, SIGTERM)
resume to exactly the uninterrupted run (dropout on) and never leave an unreadable checkpoint; the
NaN guard of each phase; resume refuses another run's checkpoint; FSDP under a 2-process gloo
torchrun, stopped and resumed, equals uninterrupted DDP. CPU, tiny models."""
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from inprocess import run_main
from checkpoints import load_checkpoint, save_checkpoint
from configurator import RENAMED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# sft_steps=40 keeps the warm-up long enough (~1 s) for a signal to land in it; dropout on, so that
# a resume is exact only if it restores the RNG state the update draws its dropout masks from
TINY = ["--dropout=0.1", "--n_layer=1", "--n_head=2", "--n_embd=32", "--n_train=64", "--n_val=8",
        "--n_test=8", "--sft_steps=40", "--sft_batch_size=8", "--sft_eval_interval=100",
        "--sft_target_acc=0", "--latro_steps=6", "--batch_size=2", "--rloo_k=4",
        "--micro_batch_size=4", "--max_rationale_tokens=12", "--max_new_tokens=16", "--maj_k=2",
        "--eval_interval=2", "--export_hf=False"]
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
RENAMED_AS = {new: old for old, new in RENAMED.items()}  # a new key -> its former name


def run(args, launcher=None):
    """latro.py with args, in this process (tests/inprocess.py) or under a launcher (torchrun);
    returns (returncode, stdout, stderr) as a finished subprocess would."""
    if launcher is None:
        return run_main("latro.py", args)
    return subprocess.run([*launcher, os.path.join(ROOT, "latro.py"), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def run_and_signal(args, marker, signum):
    """Start a run, send `signum` once a stdout line starts with `marker`; returns (exit code,
    stdout)."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "latro.py"), *args], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, sent = [], False
    for line in p.stdout:
        out.append(line)
        if not sent and line.startswith(marker):
            p.send_signal(signum)
            sent = True
    assert sent, "".join(out)[-2000:]
    return p.wait(timeout=300), "".join(out)


def step_lines(stdout):
    """The logged LaTRO steps without their timings: what must be identical after a resume."""
    return [re.sub(r" \| tok/s.*", "", l) for l in stdout.splitlines() if re.match(r"step \d+/", l)]


def assert_same_state(a, b):
    ca, cb = (load_checkpoint(os.path.join(a, "ckpt.pt")),
              load_checkpoint(os.path.join(b, "ckpt.pt")))
    assert ca["iter_num"] == cb["iter_num"]
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert (torch.equal(sa["exp_avg"], sb["exp_avg"])
                and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"]))


def assert_readable(out_dir):
    for name in ("ckpt.pt", "best.pt"):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            load_checkpoint(path)  # raises on a truncated or corrupt file


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its out_dir and its logged steps."""
    d = str(tmp_path_factory.mktemp("uninterrupted"))
    p = run(TINY + [f"--out_dir={d}"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(step_lines(p.stdout)) == 6
    return d, step_lines(p.stdout)


def test_the_logged_lr_follows_the_schedule(reference):
    # the lr each logged step used is lr_at(step, lr, latro_steps): 1e-4 decaying linearly over 6
    # steps
    from latro import lr_at
    # (step_lines cut the timings)
    logged = [re.search(r"\| lr (\S+)$", l)[1] for l in reference[1]]
    assert logged == [f"{lr_at(s, 1e-4, 6):.2e}" for s in range(6)]
    assert logged == ["1.00e-04", "8.33e-05", "6.67e-05", "5.00e-05", "3.33e-05", "1.67e-05"]


def test_kills_at_several_moments_resume_to_the_uninterrupted_run(reference, tmp_path):
    ref_dir, ref_steps = reference
    d = str(tmp_path)
    # 1. SIGKILL right after the warm-up's checkpoint, during the long pre-LaTRO test evaluation
    code, _ = run_and_signal(TINY + [f"--out_dir={d}"], f"saved {d}/ckpt.pt at step 0",
                             signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert_readable(d)
    # saved before that evaluation
    assert load_checkpoint(os.path.join(d, "ckpt.pt"))["before"] is None
    # 2. resumed, then SIGTERM mid-LaTRO: a checkpoint at the next step boundary and a clean exit
    code, out = run_and_signal(TINY + [f"--out_dir={d}", "--init_from=resume"], "step 2/6",
                               signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and "Traceback" not in out, out[-2000:]
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+): \S+ saved; "
                            r"continue with --init_from=resume", out)[1])
    assert load_checkpoint(os.path.join(d, "ckpt.pt"))["iter_num"] == stopped
    # 3. resumed, then SIGKILL mid-LaTRO (the last checkpoint is at most eval_interval steps old)
    code, _ = run_and_signal(TINY + [f"--out_dir={d}", "--init_from=resume"],
                             f"step {stopped + 1}/6", signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert_readable(d)
    # 4. resumed to the end: the same weights, optimizer state and logged steps as never
    # interrupted, from a checkpoint written with the keys' former names (best_dev_acc, n_dev, lr,
    # ...)
    old = load_checkpoint(os.path.join(d, "ckpt.pt"))
    old["best_dev_acc"] = old.pop("best_val_acc")
    old["config"] = {RENAMED_AS.get(k, k): v for k, v in old["config"].items()}
    save_checkpoint(os.path.join(d, "ckpt.pt"), old)
    p = run(TINY + [f"--out_dir={d}", "--init_from=resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = step_lines(p.stdout)
    assert resumed and resumed == ref_steps[-len(resumed):]
    assert_same_state(ref_dir, d)


def test_sigterm_in_the_warm_up_saves_and_resumes_exactly(reference, tmp_path):
    ref_dir, ref_steps = reference
    d = str(tmp_path)
    code, out = run_and_signal(TINY + [f"--out_dir={d}"], "sft 0/40", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and "Traceback" not in out, out[-2000:]
    m = re.search(r"stopped by SIGTERM at (sft )?step (\d+)", out)
    assert m, out[-2000:]
    if m[1]:  # (almost always) inside the warm-up: a checkpoint of the warm-up itself
        ck = load_checkpoint(os.path.join(d, "ckpt.pt"))
        assert ck["phase"] == "sft" and ck["sft_iter"] == int(m[2]) < 40
    p = run(TINY + [f"--out_dir={d}", "--init_from=resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert step_lines(p.stdout) == ref_steps[-len(step_lines(p.stdout)):]
    assert_same_state(ref_dir, d)


def test_resume_refuses_a_checkpoint_of_another_shape_or_seed(reference, tmp_path):
    d = str(tmp_path / "copy")
    shutil.copytree(reference[0], d)
    p = run(TINY + [f"--out_dir={d}", "--init_from=resume", "--n_embd=64", "--seed=7"])
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "(seed: checkpoint 1337, now 7; n_embd: checkpoint 32, now 64)" in p.stderr
    assert "data:" not in p.stdout  # refused before the data


def test_nan_guard_in_the_warm_up(tmp_path):
    # sft_learning_rate=1e30: the first update blows the weights up, the second step's loss is nan:
    # stop before its update
    p = run(TINY + [f"--out_dir={tmp_path}", "--sft_learning_rate=1e30"])
    assert p.returncode == 1, p.stderr[-3000:]
    assert "sft step 1: the loss (nan) or a gradient (norm nan) is nan/inf" in p.stderr
    assert "training diverged; stopped before the update" in p.stderr and p.stderr.count("\n") == 1
    assert not os.path.exists(tmp_path / "ckpt.pt") and not os.path.exists(tmp_path / "best.pt")


def test_nan_guard_in_latro_keeps_the_last_good_checkpoint(tmp_path):
    # gamma=1e38: the non-stopped rationales' reward gamma x (mean reward < 0) is -inf in fp32, the
    # advantages nan
    p = run(TINY + [f"--out_dir={tmp_path}", "--gamma=1e38"])
    assert p.returncode == 1, p.stderr[-3000:]
    assert "step 1: the loss (nan) or a gradient (norm nan) is nan/inf" in p.stderr
    assert "training diverged; stopped before the update" in p.stderr
    assert not re.search(r"^step \d+/", p.stdout, re.M)  # no step was taken
    # the last good state, written before the first step
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter_num"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


# ---- 2 processes (gloo): FSDP against DDP, and an FSDP resume ------------------------------------
# 1 prompt x 4 rollouts per rank in 2 micro-steps: the no-sync micro-step and the synced one
DIST = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--n_train=64", "--n_val=8", "--n_test=8",
        "--sft_steps=3", "--sft_batch_size=8", "--sft_target_acc=0", "--latro_steps=4",
        "--batch_size=2", "--rloo_k=4", "--micro_batch_size=2", "--max_rationale_tokens=12",
        "--max_new_tokens=16", "--maj_k=2", "--eval_interval=2", "--device=cpu"]
# FSDP reduces gradients in another order than DDP: equal within fp32 round-off (measured:
# bit-identical here)
TOL = 1e-6


@pytest.fixture(scope="module")
def ddp_and_fsdp(tmp_path_factory):
    """An uninterrupted DDP run, and an FSDP run stopped after step 2 (stop_at_step) and resumed:
    the FSDP run's stdout is both invocations' output, its out_dir the resumed run's."""
    d = str(tmp_path_factory.mktemp("ddp"))
    p = run(DIST + [f"--out_dir={d}", "--fsdp=False"], launcher=TORCHRUN)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = {"ddp": (d, p.stdout)}
    d, outs = str(tmp_path_factory.mktemp("fsdp")), []
    for args in (["--stop_at_step=2"], ["--init_from=resume"]):
        p = run(DIST + [f"--out_dir={d}", "--fsdp=True", *args], launcher=TORCHRUN)
        assert p.returncode == 0, p.stderr[-3000:]
        outs.append(p.stdout)
    assert "stopped at step 2 (stop_at_step)" in outs[0] and len(step_lines(outs[1])) == 2
    runs["fsdp"] = d, "".join(outs)
    return runs


def test_two_process_ddp_keeps_parameters_identical(ddp_and_fsdp):
    out = ddp_and_fsdp["ddp"][1]
    assert "ddp: parameters identical on 2 ranks: True" in out
    assert "per rank 1 prompts, 4 rollouts, 2 micro-steps" in out


def test_fsdp_stopped_and_resumed_equals_uninterrupted_ddp(ddp_and_fsdp):
    """Two invariants in one pair of runs: FSDP trains as DDP does, and an FSDP run stopped after
    step 2 and resumed continues exactly (a resume that lost the optimizer state, the RNG or the
    step would move the logged steps 3-4 and the final weights far beyond the round-off
    tolerance)."""
    (dd, dout), (fd, fout) = ddp_and_fsdp["ddp"], ddp_and_fsdp["fsdp"]
    assert "model: scratch, 0.02M parameters, on cpu (FSDP)" in fout
    assert "memory plan:" in fout and "fsdp on 2 CPU processes" in fout
    assert "(the host's memory per process)" in fout
    # the same logged steps (rewards, KL, losses, lr), the warm-up, evaluations and test metrics
    assert step_lines(fout) == step_lines(dout) and len(step_lines(fout)) == 4
    for prefix in ("sft ", "eval step", "before LaTRO", "after LaTRO"):
        lines = lambda out: [re.sub(r"\| [\d.]+s$", "", l) for l in out.splitlines()
                             if l.startswith(prefix)]
        assert lines(fout) == lines(dout), prefix
    cd, cf = (load_checkpoint(os.path.join(dd, "ckpt.pt")),
              load_checkpoint(os.path.join(fd, "ckpt.pt")))
    # the FSDP checkpoint is a plain full state dict
    assert sorted(cd["model"]) == sorted(cf["model"])
    for part in ("model", "ref_model"):
        for k in cd[part]:
            assert (cd[part][k] - cf[part][k]).abs().max().item() <= TOL, (part, k)
    for sd, sf in zip(cd["optimizer"]["state"].values(), cf["optimizer"]["state"].values()):
        assert (sd["exp_avg"] - sf["exp_avg"]).abs().max().item() <= TOL


def test_fsdp_export_loads_with_from_pretrained(ddp_and_fsdp):
    from transformers import AutoModelForCausalLM
    fd = ddp_and_fsdp["fsdp"][0]
    model = AutoModelForCausalLM.from_pretrained(os.path.join(fd, "hf"))
    # the exported weights are the selected ones
    best = load_checkpoint(os.path.join(fd, "best.pt"))["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, best[k]), k
