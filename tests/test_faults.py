"""Faults that fresh probes of the scripts found: each case below ended late (work lost before the
error), silently (a wrong result), in a hang, or with a raw traceback before its fix. Each now ends
early with one clear line, or does the right thing."""
import os
import signal
import subprocess
import sys
import zipfile

import pytest
import torch

import checkpoints
import configurator
import latro
import preflight
import run
from checkpoints import check_same_run, load_checkpoint, save_checkpoint
from configurator import ConfigError, UserError, configure
from inprocess import COCONUT_TINY, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
COCONUT = COCONUT_TINY + ["--epochs_per_stage=1"]
LATRO = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--n_train=64", "--n_val=8", "--n_test=64",
         "--sft_steps=3", "--sft_batch_size=8", "--sft_target_acc=0", "--latro_steps=2",
         "--batch_size=2", "--rloo_k=4", "--micro_batch_size=4", "--max_rationale_tokens=8",
         "--max_new_tokens=12", "--maj_k=2", "--eval_interval=1", "--export_hf=False"]


class Usage:
    """What shutil.disk_usage returns, with only the free bytes set."""
    def __init__(self, free):
        self.free = free


def refused(script, args, message):
    """The run stops with a UserError holding `message` before any training step."""
    r = run_main(script, args)
    assert r.code == 1 and r.error is not None, r.out[-2000:]
    assert message in str(r.error), str(r.error)
    assert "\nstep " not in r.out and "\nsft 0/" not in r.out, r.out[-2000:]
    return str(r.error)


# ---- late: work lost before the error ---------------------------------------------------------

def test_a_resume_whose_best_pt_is_missing_or_truncated_is_refused_before_training(tmp_path):
    d = tmp_path / "run"
    r = run_main("coconut.py", COCONUT + [f"--out_dir={d}", "--num_epochs=3"])   # stages 0, 1, 2
    assert r.code == 0 and (d / "best.pt").exists(), r.out[-2000:]
    best = (d / "best.pt").read_bytes()
    (d / "best.pt").write_bytes(best[:len(best) // 2])                # a copy cut short
    msg = refused("coconut.py", COCONUT + [f"--out_dir={d}", "--num_epochs=4",
                                           "--init_from=resume"], "best.pt is truncated")
    assert "tests them at the end" in msg and "restore it" in msg
    (d / "best.pt").unlink()
    refused("coconut.py", COCONUT + [f"--out_dir={d}", "--num_epochs=4", "--init_from=resume"],
            "best.pt is missing")
    (d / "best.pt").write_bytes(best)                                  # restored: it resumes
    r = run_main("coconut.py", COCONUT + [f"--out_dir={d}", "--num_epochs=4",
                                          "--init_from=resume"])
    assert r.code == 0 and "\nstep 7/8 " in r.out, r.out[-2000:]
    # latro.py the same way: its best.pt is checked when the resumed run starts
    d = tmp_path / "latro"
    r = run_main("latro.py", LATRO + [f"--out_dir={d}", "--stop_at_step=1"])
    assert r.code == 0 and (d / "best.pt").exists(), r.out[-2000:]
    (d / "best.pt").unlink()
    refused("latro.py", LATRO + [f"--out_dir={d}", "--init_from=resume"], "best.pt is missing")


def test_a_full_disk_or_a_read_only_out_dir_is_one_line_and_keeps_the_last_checkpoint(
        tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"step": 1, "w": torch.ones(1000)})

    def no_room(obj, f):                     # what torch.save raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")

    monkeypatch.setattr(torch, "save", no_room)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: Usage(100))
    with pytest.raises(UserError, match=r"writing .*ckpt.pt failed \(the disk is full: 0 MiB "
                                        r"free, the checkpoint needs about 0 MiB\); the previous "
                                        r"ckpt.pt is kept"):
        save_checkpoint(path, {"step": 2, "w": torch.ones(1000)})

    def read_only(obj, f):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(torch, "save", read_only)
    with pytest.raises(UserError, match=r"failed \(Permission denied\); the previous ckpt.pt is "
                                        r"kept: make room or fix"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_disk_too_small_for_the_checkpoints_is_refused_before_work(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(1000))
    refused("latro.py", LATRO + [f"--out_dir={tmp_path}"], "has 0.00 GiB free, but this run's "
            "checkpoints need about")
    refused("coconut.py", COCONUT + [f"--out_dir={tmp_path / 'c'}"], "free space or choose")


def test_a_plan_larger_than_the_host_memory_is_refused_on_the_cpu(tmp_path):
    # 2 layers of 65,536 dimensions: about 100B parameters, a plan of terabytes; it used to
    # allocate until the machine ran out
    for shape in (["--n_embd=65536"], ["--n_layer=10000", "--n_embd=128", "--n_head=4"]):  # 2B
        msg = refused("coconut.py", COCONUT + [f"--out_dir={tmp_path}", *shape],
                      "exceeds the host memory per process")
        assert "GiB per process" in msg


# ---- silent: a wrong result without an error ----------------------------------------------------

def test_latro_resume_refuses_a_changed_objective_and_reads_renamed_keys():
    cfg = configure(dict(vars(latro)), [], verbose=False)
    ckpt = {"source": "scratch", "config": dict(cfg)}
    # the keys run.Run checks on a resume of a model from scratch
    keys = run.RESUME_KEYS["latro"] + run.SHAPE_KEYS["latro"]
    renamed = configurator.RENAMED
    for key, value in [("learning_rate", 3e-4), ("batch_size", 16), ("rloo_k", 4), ("beta", 0.1)]:
        with pytest.raises(UserError, match=f"{key}: checkpoint "):
            check_same_run(ckpt["config"], {**cfg, key: value}, keys, renamed)
    # a checkpoint written before a key was renamed (lr, n_dev) is read under the new names
    former = {new: old for old, new in renamed.items()}
    old = {former.get(k, k): v for k, v in cfg.items()}
    assert "lr" in old and "learning_rate" not in old
    check_same_run(old, cfg, keys, renamed)
    with pytest.raises(UserError, match="learning_rate: checkpoint 0.0001, now 0.001"):
        check_same_run(old, {**cfg, "learning_rate": 1e-3}, keys, renamed)


def test_the_resume_key_tables_name_only_keys_of_their_script():
    # run.py holds the tables; check_same_run finds a key absent from both configurations equal,
    # so a misspelt or removed key there would go unchecked without this
    import coconut
    for name, script in (("coconut", coconut), ("latro", latro)):
        keys = set(configure(dict(vars(script)), [], verbose=False))
        assert set(run.RESUME_KEYS[name]) | set(run.SHAPE_KEYS[name]) <= keys
        assert "seed" in run.RESUME_KEYS[name] and "out_dir" not in run.RESUME_KEYS[name]


# the script, with a SIGTERM sent to itself when the final test loads best.pt (a preemption then)
SIGNAL_AT_FINAL_TEST = """
import os, runpy, signal, sys
import checkpoints
real = checkpoints.load_checkpoint
def load_and_signal(path, *args, **kwargs):
    if path.endswith("best.pt"):
        os.kill(os.getpid(), signal.SIGTERM)
    return real(path, *args, **kwargs)
checkpoints.load_checkpoint = load_and_signal
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script, args", [("latro.py", LATRO),
                                          ("coconut.py", COCONUT + ["--num_epochs=3"])])
def test_a_signal_during_the_final_test_ends_the_process_at_once(script, args, tmp_path):
    # the loop's stop flag is put back after the loop: a signal during the final test acts at once,
    # as for any process, instead of printing that it will stop and then finishing with status 0
    p = subprocess.run([sys.executable, "-c", SIGNAL_AT_FINAL_TEST, script, *args,
                        f"--out_dir={tmp_path}"], cwd=ROOT, env={**ENV, "PYTHONPATH": ROOT},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGTERM, p.stdout[-2000:] + p.stderr[-2000:]
    final = {"latro.py": "after LaTRO", "coconut.py": "test acc"}[script]
    assert "stopping after this step" not in p.stderr and final not in p.stdout


# ---- raw: a traceback or a misleading hint instead of one line ----------------------------------

def test_init_from_that_is_not_a_checkpoint_or_a_model(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_checkpoint(str(run_dir / "best.pt"), {"model": {}, "iter_num": 3})
    # (a learning rate given: a pretrained model's run refuses the demo's)
    refused("coconut.py", COCONUT + [f"--init_from={run_dir}", f"--out_dir={tmp_path / 'o1'}",
                                     "--learning_rate=1e-4"],
            "is an out_dir of this project, not a Hugging Face model: give its best.pt")
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    refused("coconut.py", COCONUT + [f"--init_from={tmp_path / 'tensor.pt'}",
                                     f"--out_dir={tmp_path / 'o2'}"],
            "holds a Tensor, not a checkpoint of this project")
    (tmp_path / "notes.pt").write_text("not a checkpoint\nsecond line\n")
    msg = refused("coconut.py", COCONUT + [f"--init_from={tmp_path / 'notes.pt'}",
                                           f"--out_dir={tmp_path / 'o3'}"], "corrupt or truncated")
    assert "\n" not in msg
    with zipfile.ZipFile(tmp_path / "archive.pt", "w") as z:            # a zip renamed .pt
        z.writestr("notes.txt", "not a checkpoint")
    msg = refused("coconut.py", COCONUT + [f"--init_from={tmp_path / 'archive.pt'}",
                                           f"--out_dir={tmp_path / 'o4'}"], "corrupt or truncated")
    assert "\n" not in msg
    # best.pt copied over ckpt.pt "to resume from the best epoch": say how to do that instead
    for script, args in (("coconut.py", COCONUT), ("latro.py", LATRO)):
        d = tmp_path / f"copied_{script}"
        save_checkpoint(str(d / "ckpt.pt"), {"model": {}, "iter_num": 3})
        refused(script, args + [f"--out_dir={d}", "--init_from=resume"],
                "holds weights only (a best.pt?): resuming needs the ckpt.pt")


@pytest.mark.parametrize("args, message", [
    (["--learning_rate=1e999"], "learning_rate=inf: give a finite number"),
    (["--device=cuda"], "device='cuda' but this torch sees no CUDA GPU"),
    (["--seed=18446744073709551616"], "seed=18446744073709551616: give a seed in [0, 2**32)"),
])
def test_coconut_refuses_what_latro_refused(args, message, tmp_path):
    if torch.cuda.is_available() and "cuda" in args[0]:
        pytest.skip("this machine has a CUDA GPU")
    refused("coconut.py", COCONUT + [f"--out_dir={tmp_path}", *args], message)


def test_config_files_that_are_not_utf8_a_directory_or_define_helpers(tmp_path):
    scope = {"out_dir": "out", "learning_rate": 1e-3}
    latin = tmp_path / "latin.py"
    latin.write_bytes(b'out_dir = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin.py' is not UTF-8 text \(byte 14: b'\\xe9'\)"):
        configure(dict(scope), [str(latin)], verbose=False)
    (tmp_path / "dir.py").mkdir()
    with pytest.raises(ConfigError, match="dir.py' is a directory: give a .py file"):
        configure(dict(scope), [str(tmp_path / "dir.py")], verbose=False)
    helpers = tmp_path / "helpers.py"
    helpers.write_text("def double(x):\n    return 2 * x\nclass K:\n    pass\n"
                       "learning_rate = double(0.001)\n")
    assert configure(dict(scope), [str(helpers)], verbose=False)["learning_rate"] == 0.002


def test_a_stale_rank_in_the_environment_is_one_line(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    for var in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="RANK set but WORLD_SIZE, MASTER_ADDR, MASTER_PORT not: "
                                          "launch with torchrun"):
        configure({"out_dir": "out"}, [], verbose=False)


def test_the_probe_shows_at_most_the_whole_vocabulary():
    from coconut import probe_thoughts
    from model import load_model
    torch.manual_seed(0)
    m = load_model("scratch", 12, n_layer=1, n_head=2, n_embd=16, block_size=32).eval()
    probs, ids = probe_thoughts(m, [3, 4, 11, 11, 5], 11, 50, "cpu")  # k = 50 > 12 tokens
    assert probs.shape == ids.shape == (2, 12) and sorted(ids[0].tolist()) == list(range(12))


def test_impossible_generator_options_fail_fast_instead_of_for_an_hour():
    # 3-node graphs cannot hold a 4-hop answer path: every draw fails, and 50 failures in a row
    # (50,000 graphs here) end it with the options to change, where it used to try for an hour
    import data
    with pytest.raises(UserError, match="50 examples in a row could not be generated with"):
        data.load_task("prosqa_small", "train", n=8, min_nodes=3, max_nodes=3, min_hops=4,
                       max_hops=4)
