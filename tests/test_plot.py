"""The metrics log (out_dir/log.jsonl) and plot.py: a run killed with SIGKILL and resumed logs every
step exactly once, in order, the same steps and losses as a run never interrupted; plot.py draws a
PNG from a Coconut and from a LaTRO log, overlays several runs in one file, and refuses a missing
log or a missing matplotlib in one line. CPU, tiny runs; a subprocess only for the kill and for
plot.py's exit status."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import plot
from configurator import UserError
from inprocess import COCONUT_TINY, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
PNG = b"\x89PNG\r\n\x1a\n"
# 32 training examples in batches of 8: 4 steps per epoch, 2 epochs (stage 0, then 1 thought), a
# checkpoint every 2 steps
ARGS = COCONUT_TINY + ["--learning_rate=0.01", "--n_train=32", "--num_epochs=2",
                       "--epochs_per_stage=1", "--ckpt_interval=2"]
N_STEPS = 8
LATRO_TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--n_train=64", "--n_val=8",
              "--n_test=8", "--sft_steps=10", "--sft_batch_size=8", "--sft_eval_interval=5",
              "--sft_target_acc=0", "--latro_steps=4", "--batch_size=2", "--rloo_k=4",
              "--micro_batch_size=4", "--max_rationale_tokens=12", "--max_new_tokens=16",
              "--maj_k=2", "--eval_interval=2", "--export_hf=False"]


def rows_of(out_dir):
    with open(os.path.join(out_dir, "log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def steps_and(rows, key):
    """(step, value) of the rows holding `key`, in log order."""
    return [(r["step"], r[key]) for r in rows if key in r]


@pytest.fixture(scope="module")
def coconut_runs(tmp_path_factory):
    """Two uninterrupted tiny coconut runs, seeds 0 and 1 (in this process): their out_dirs."""
    dirs = []
    for seed in (0, 1):
        d = tmp_path_factory.mktemp(f"coconut_seed{seed}")
        r = run_main("coconut.py", ARGS + [f"--out_dir={d}", f"--seed={seed}"])
        assert r.code == 0, (r.error, r.out[-2000:])
        dirs.append(d)
    return dirs


def kill_after_step(out_dir, step):
    """coconut.py in a process of its own, SIGKILLed once it has printed `step` and written that
    step's row to its log (after the checkpoint of the step before: rows the checkpoint has not
    seen); its stdout."""
    p = subprocess.Popen([sys.executable, "coconut.py", *ARGS, f"--out_dir={out_dir}"], cwd=ROOT,
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith(f"step {step}/"):
            deadline = time.time() + 60
            while step not in [s for s, _ in steps_and(rows_of(out_dir), "loss")]:
                assert time.time() < deadline and p.poll() is None, "".join(lines)[-2000:]
                time.sleep(0.001)
            p.send_signal(signal.SIGKILL)
            break
    out, _ = p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL, "".join(lines)[-2000:]
    return "".join(lines) + out


def test_the_log_holds_every_step_once_after_a_kill_and_a_resume(coconut_runs, tmp_path):
    d = tmp_path / "killed"
    kill_after_step(d, 3)
    import torch
    saved = torch.load(d / "ckpt.pt", weights_only=True)["iter_num"]
    assert saved in (2, 4)  # the last interval save before the kill landed (almost always 2)
    killed = steps_and(rows_of(d), "loss")
    assert [s for s, _ in killed][:3] == [1, 2, 3]
    r = run_main("coconut.py", ARGS + [f"--out_dir={d}", "--init_from=resume"])
    assert r.code == 0, (r.error, r.out[-2000:])
    assert f"step {saved + 1}/{N_STEPS}" in r.out  # it went on from its checkpoint (step 3 again)
    rows = rows_of(d)
    # the step rows 1..N, each once and in order; one val row per epoch, at its last step; the
    # test row once, at the end
    assert [s for s, _ in steps_and(rows, "loss")] == list(range(1, N_STEPS + 1))
    assert [s for s, _ in steps_and(rows, "val_loss")] == [N_STEPS // 2, N_STEPS]
    assert [s for s, _ in steps_and(rows, "test_acc")] == [N_STEPS]
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    # the same steps, losses and validations as the run never interrupted (seed 0)
    straight = rows_of(coconut_runs[0])
    for key in ("loss", "val_loss", "val_acc", "test_acc"):
        assert steps_and(rows, key) == steps_and(straight, key), key
    assert len(rows) == len(straight)


def draws(tmp_path, *run_dirs, name="curves.png"):
    """plot.py's main on run_dirs into tmp_path/name; the PNG's bytes and the figure drawn."""
    import matplotlib.pyplot as plt
    out = tmp_path / name
    plot.main([*map(str, run_dirs), f"--out={out}"])
    fig = plt.gcf()
    plt.close(fig)
    return out.read_bytes(), fig


def curves(fig):
    """{panel title: [line labels]} of a figure plot.py drew."""
    return {ax.get_title(): [line.get_label() for line in ax.get_lines()
                             if not line.get_label().startswith("_")]  # (the stage switches)
            for ax in fig.axes}


def test_plot_draws_coconut_and_latro_logs_and_overlays_runs(coconut_runs, tmp_path, capsys):
    png, fig = draws(tmp_path, coconut_runs[0], name="one.png")
    assert png.startswith(PNG) and len(png) > 1000
    name0, name1 = (os.path.basename(d) for d in coconut_runs)
    assert curves(fig) == {"training loss": [name0], "val accuracy (greedy)": [name0]}
    # the loss curve is the log's: one point per optimizer step
    loss_line = fig.axes[0].get_lines()[0]
    assert list(loss_line.get_xdata()) == list(range(1, N_STEPS + 1))
    assert capsys.readouterr().out == f"wrote {tmp_path / 'one.png'}\n"
    # two runs overlaid in one file: each panel holds one curve per run
    png, fig = draws(tmp_path, *coconut_runs, name="both.png")
    assert png.startswith(PNG)
    assert all(labels == [name0, name1] for labels in curves(fig).values()), curves(fig)
    # a LaTRO log: its own panels (reward, KL, stopped share, val accuracy)
    d = tmp_path / "latro"
    r = run_main("latro.py", LATRO_TINY + [f"--out_dir={d}"])
    assert r.code == 0, (r.error, r.out[-2000:])
    png, fig = draws(tmp_path, d, name="latro.png")
    assert png.startswith(PNG)
    titles = [t for t in curves(fig) if t]
    assert len(titles) == 4 and any("reward" in t for t in titles)
    assert any("KL" in t for t in titles) and any("stopped" in t for t in titles)
    reward = next(ax for ax in fig.axes if "reward" in ax.get_title()).get_lines()[0]
    assert list(reward.get_xdata()) == [1, 2, 3, 4]
    # the default --out: out_dir/curves.png
    plot.main([str(d)])
    assert (d / "curves.png").read_bytes().startswith(PNG)


def test_plot_of_a_missing_log_is_one_line_and_status_1(tmp_path):
    missing = tmp_path / "missing_dir"
    p = subprocess.run([sys.executable, "plot.py", str(missing)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == "", p.stderr
    assert p.stderr.startswith(f"error: {missing}/log.jsonl not found"), p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_plot_without_matplotlib_says_how_to_install_it(coconut_runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    with pytest.raises(UserError, match="pip install matplotlib"):
        plot.draw([str(coconut_runs[0])], str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()
