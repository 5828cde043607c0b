"""coconut.py as a user runs it, the reliability side: a run killed (SIGKILL) or stopped (SIGTERM)
mid-epoch resumes to exactly the uninterrupted run; a resume with other settings, or from another
script's checkpoint, is refused by name; a diverging run stops before non-finite weights are
written; a preset with --init_from=DIR works offline with the model's own tokenizer."""
import os
import signal
import subprocess
import sys

import torch

from inprocess import COCONUT_TINY, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = COCONUT_TINY + ["--learning_rate=0.01"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def launch(args, out_dir):
    return subprocess.Popen([sys.executable, "coconut.py", *TINY, f"--out_dir={out_dir}", *args],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def run(args, out_dir):
    """A run that needs no signal: in this process (tests/inprocess.py). Returns (exit code, stdout,
    stderr) as the process would: a UserError is `error: ...` on stderr and status 1."""
    r = run_main("coconut.py", TINY + [f"--out_dir={out_dir}", *args])
    return r.returncode, r.stdout, r.stderr


def steps(stdout):
    """{step number: loss} of the per-step log lines."""
    got = {}
    for line in stdout.splitlines():
        if line.startswith("step "):
            got[int(line.split()[1].split("/")[0])] = float(line.split("| loss ")[1].split()[0])
    return got


def run_until(args, out_dir, step, sig):
    """Start a run, send `sig` once it has logged `step`, and return (exit code, stdout, stderr)."""
    p = launch(args, out_dir)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith(f"step {step}/"):
            p.send_signal(sig)
            break
    out, err = p.communicate(timeout=300)
    return p.returncode, "".join(lines) + out, err


def ckpt(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


def test_killed_and_stopped_runs_resume_to_the_uninterrupted_run_and_a_truncated_one_is_refused(
        tmp_path):
    # 4 steps per epoch, 2 epochs (stage 0, then 1 thought), dropout on, a checkpoint every step
    args = ["--n_train=32", "--num_epochs=2", "--epochs_per_stage=1", "--dropout=0.1",
            "--ckpt_interval=1"]
    rc, out, err = run(args, tmp_path / "straight")
    assert rc == 0, err[-2000:]
    want = steps(out)
    assert sorted(want) == list(range(1, 9))
    d = tmp_path / "cut"
    # SIGKILL in the middle of epoch 0: the last checkpoint is whole and says where the epoch was
    rc, out, _ = run_until(args, d, 3, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    seen = steps(out)
    c = ckpt(d)
    assert c["epoch"] == 0 and c["step_in_epoch"] in (2, 3) and c["iter_num"] == c["step_in_epoch"]
    # resume, then SIGTERM in the middle of epoch 1: a checkpoint at the step boundary and a clean
    # exit
    rc, out, err = run_until(args + ["--init_from=resume"], d, 6, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and "stopped by SIGTERM after step" in out, err[-2000:]
    assert min(steps(out)) == c["iter_num"] + 1
    seen.update(steps(out))
    c = ckpt(d)
    assert (c["epoch"] == 1 and 2 <= c["step_in_epoch"] < 4
            and c["iter_num"] == 4 + c["step_in_epoch"])
    rc, out, err = run(args + ["--init_from=resume"], d)
    assert rc == 0, err[-2000:]
    seen.update(steps(out))
    # every step's loss (dropout included) and the final weights equal the uninterrupted run's
    assert seen == want
    a, b = ckpt(tmp_path / "straight"), ckpt(d)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert b["iter_num"] == 8 and b["epoch"] == 2
    # reset_optimizer='stage': a new AdamW at epoch 1 (stage 0 -> 1), so 4 steps, not 8, in both
    # runs
    assert all(st["step"] == 4 for c in (a, b) for st in c["optimizer"]["state"].values())
    # a truncated checkpoint (a write cut short outside save_checkpoint's atomic rename) is refused
    path = d / "ckpt.pt"
    path.write_bytes(path.read_bytes()[:1000])
    rc, out, err = run(args + ["--num_epochs=3", "--init_from=resume"], d)
    assert rc == 1 and "corrupt or truncated" in err and not steps(out), err[-2000:]


def test_resume_refuses_other_settings_other_scripts_and_divergence(tmp_path, monkeypatch):
    d = tmp_path / "run"
    rc, out, err = run(["--num_epochs=1", "--ckpt_interval=1"], d)
    assert rc == 0, err[-2000:]
    good = ckpt(d)

    def refused(args, message, out_dir=d):
        rc, out, err = run(args, out_dir)
        assert rc == 1 and err.startswith("error: ") and message in err, err[-2000:]
        assert not steps(out)

    # resume with another model shape and seed: refused, naming both keys (never silently the old
    # ones)
    refused(["--num_epochs=2", "--init_from=resume", "--n_layer=2", "--seed=1"],
            "(n_layer: checkpoint 1, now 2; seed: checkpoint 0, now 1)")
    # a scratch run over a resumable checkpoint
    refused(["--num_epochs=2"], "holds ckpt.pt of an earlier run")
    # another script's checkpoint (latro.py's config has no Coconut method)
    other = tmp_path / "latro.pt"
    torch.save({"model": good["model"], "config": {"n_layer": 1, "task": "gsm8k"}}, other)
    refused([f"--init_from={other}"], "is not a coconut.py checkpoint", tmp_path / "other")

    # divergence: an update that makes the weights infinite is never written over the good ckpt.pt.
    # No option reaches it any more (learning_rate x weight_decay >= 1 is refused before any work,
    # and a finite loss and gradient move a weight by about lr), so AdamW's step is made to write
    # an inf into the first weight
    adamw_step = torch.optim.AdamW.step

    def step_to_inf(self, *args, **kwargs):
        result = adamw_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step_to_inf)
    rc, out, err = run(["--num_epochs=2", "--init_from=resume", "--ckpt_interval=1"], d)
    monkeypatch.undo()
    assert rc == 1 and "non-finite weights" in err and "ckpt.pt not written" in err, err[-2000:]
    assert err.count("\n") == 1
    # a non-finite loss stops the run before its update (no interval save in between)
    # (weight_decay=0: learning_rate x weight_decay >= 1 is refused before any work)
    rc, out, err = run(["--num_epochs=2", "--init_from=resume", "--learning_rate=1e30",
                        "--weight_decay=0", "--ckpt_interval=0"], d)
    assert rc == 1 and "training diverged; stopped before the update" in err, err[-2000:]
    after = ckpt(d)
    assert all(torch.equal(good["model"][k], after["model"][k]) for k in good["model"])
    assert after["iter_num"] == good["iter_num"]


OPTS = dict(symbolic=True, min_nodes=6, max_nodes=8, min_hops=1, max_hops=2)


def tiny_hf_dir(path, n_train=16):
    """A tiny GPT-2 and the task's word tokenizer saved the Hugging Face way (save_pretrained)."""
    import data
    import vocab
    from model import load_model
    exs = [ex for s in ("train", "val", "test") for ex in data.load_task(
        "prosqa_small", s, n=n_train if s == "train" else 4, **OPTS)]
    tok = vocab.build_tokenizer("words", exs)
    torch.manual_seed(0)
    load_model("scratch", len(tok), n_layer=1, n_head=2, n_embd=32,
               block_size=256).save_pretrained(path)
    tok.save_pretrained(path)
    return tok


def test_preset_with_a_local_model_directory_runs_offline_with_its_own_tokenizer(tmp_path):
    # the preset names no tokenizer, so --init_from=DIR is enough with HF_HUB_OFFLINE=1 (the
    # preset's task/data/batch are shrunk)
    model_dir = tmp_path / "tiny_hf"
    tok = tiny_hf_dir(model_dir)
    p = run_main("coconut.py", ["config/coconut_prosqa.py", f"--init_from={model_dir}",
                                "--data_path=", *TINY, "--num_epochs=1", "--marker_init=",
                                "--learning_rate=0.001", f"--out_dir={tmp_path / 'out'}"])
    assert p.code == 0, (p.error, p.out[-2000:])
    assert f"tokenizer: {model_dir} (the model's own)" in p.out
    assert f"vocabulary {len(tok)}\n" in p.out
    assert (tmp_path / "out" / "hf" / "config.json").exists()


def test_gradient_checkpointing_leaves_a_single_pass_method_unchanged():
    # allowed for every method but coconut (its cached thought passes would lose the cache): the
    # loss and gradients of a plain (cot / pause_as_thought) forward are the same with and without
    import copy
    from coconut import Coconut
    from model import load_model
    from parallel import enable_activation_checkpointing
    torch.manual_seed(0)
    a = load_model("scratch", 40, n_layer=2, n_head=2, n_embd=32, block_size=64)
    b = copy.deepcopy(a)
    enable_activation_checkpointing(b)
    ids = torch.randint(0, 40, (2, 10))
    mask, labels = torch.ones_like(ids), ids.clone()
    labels[:, :4] = -100
    grads = []
    for m in (a, b):
        m.train()
        loss = Coconut(m, None)(ids, mask, labels)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in m.parameters()]))
    assert b.is_gradient_checkpointing and not a.is_gradient_checkpointing
    assert abs(grads[0][0] - grads[1][0]) < 1e-6
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(grads[0][1], grads[1][1]))


def torchrun(args, out_dir):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "coconut.py", *TINY, f"--out_dir={out_dir}", *args],
                       cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)  # a hang fails here
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


# thoughts 0..4 per row (stage 1-2, c_thought=2, a random stage for half the rows): the two ranks'
# micro-batches hold different numbers of thought columns
UNEVEN = ["--max_latent_stage=2", "--c_thought=2", "--start_stage=1", "--uniform_prob=0.5",
          "--num_epochs=2", "--epochs_per_stage=1", "--marker_init=", "--learning_rate=0.01",
          "--ddp_timeout=120"]  # a hang fails in 2 minutes


def rank_thought_columns(n_epochs=2):
    """Per optimizer step, the thought columns of each rank's micro-batch, as the script draws
    them."""
    import data
    from coconut import Curriculum, epoch_order, layout
    from parallel import rank_block
    exs = data.load_task("prosqa_small", "train", n=16, **OPTS)
    n_steps = [len(ex["steps"]) for ex in exs]
    lay = dict(method="coconut", c_thought=2, max_latent_stage=2, pad_latent_to_max=True,
               special=(-1, -2, -3))
    cols = []
    for epoch in range(n_epochs):
        stage = Curriculum(**lay, start_stage=1, epochs_per_stage=1).stage(epoch)
        stages, perm = epoch_order(0, epoch, stage, 0.5, n_steps)
        for step in range(2):
            batch = perm[step * 8:(step + 1) * 8]
            cols.append([max(layout([0], [[0]] * n_steps[i], [0], stages[i],
                                    Curriculum(**lay))[0].count(-2)
                             for i in rank_block(batch, r, 0, 1, 4)) for r in range(2)])
    return cols


def test_one_process_equals_ddp_equals_fsdp_stopped_and_resumed_with_uneven_thought_columns(
        tmp_path):
    cols = rank_thought_columns()
    assert any(a != b for a, b in cols), cols                           # the case that used to hang
    model_dir = tmp_path / "tiny_hf"
    tiny_hf_dir(model_dir)
    args = UNEVEN + [f"--init_from={model_dir}"]
    rc, one, err = run(args, tmp_path / "one")
    assert rc == 0, err
    ddp = torchrun(args, tmp_path / "ddp")
    assert "ddp: parameters identical on 2 ranks: True" in ddp
    assert "global batch 8 = 4 per micro-step x 1 accumulation x 2 ranks" in ddp
    # FSDP in two invocations: epoch 0, then a resume at the epoch boundary (a gathered full
    # checkpoint)
    half = torchrun(args + ["--fsdp=True", "--num_epochs=1"], tmp_path / "fsdp")
    rest = torchrun(args + ["--fsdp=True", "--init_from=resume"], tmp_path / "fsdp")
    fsdp = half + rest
    assert "memory plan:" in fsdp and "fsdp on 2 CPU processes" in fsdp
    # stages 1 and 2 of max_latent_stage=2: no epoch is all-latent, so no best.pt is chosen
    assert ("no epoch reaches the final stage 3" in ddp
            and not (tmp_path / "ddp" / "best.pt").exists())
    # the logged losses and the weights: FSDP pads every rank's batch to one layout and reduces in
    # another order, so they agree within fp32 round-off that Adam (lr 1e-2, 4 steps) amplifies to
    # 1e-4; a resume that lost the weights, the stage or the data order would differ by far more
    l_one, l_ddp, l_fsdp = steps(one), steps(ddp), steps(fsdp)
    assert (sorted(l_ddp) == [1, 2, 3, 4] and sorted(steps(half)) == [1, 2]
            and sorted(steps(rest)) == [3, 4])
    assert max(abs(l_ddp[k] - l_fsdp[k]) for k in l_ddp) <= 2e-4
    a, b = ckpt(tmp_path / "ddp")["model"], ckpt(tmp_path / "fsdp")["model"]
    assert sorted(a) == sorted(b) and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    # one process with 2 micro-steps of 4 == 2 DDP ranks with one micro-step of 4 each: rank r's
    # block of the global batch is micro-step r of the single process (a rank taking another's
    # block: far off)
    assert sorted(l_one) == [1, 2, 3, 4] and max(abs(l_one[k] - l_ddp[k]) for k in l_ddp) <= 1e-4
    w = ckpt(tmp_path / "one")["model"]
    assert max((w[k] - a[k]).abs().max().item() for k in a) < 1e-4
    # the test accuracy line is computed inside gathered() under FSDP: the same as DDP's
    acc = [next(l for l in out.splitlines() if l.startswith("test acc")) for out in (ddp, rest)]
    assert acc[0] == acc[1]
    # the save_pretrained export under FSDP is a normal HF directory holding the last weights
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "hf").state_dict()
    assert all(torch.equal(hf[k], b[k]) for k in b if k in hf) and "transformer.wte.weight" in hf
