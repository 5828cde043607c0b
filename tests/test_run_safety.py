"""What keeps a run from losing or mixing up its work (issues 30-32), each against an expectation
worked out here, not read back from the code: --overwrite never deletes the checkpoint a run starts
from; torchrun ranks with different configurations are refused; a checkpoint keeps its word
vocabulary; a resume refuses another run's best.pt and latro.py's changed sampling or measuring
settings; the configurator's numeric and path rules; out_dir paths that cannot hold a run; the
memory plan on a CPU and of an evaluation; a divergence before any checkpoint; Run.end's DDP check;
a pretrained init_from refuses the CPU demo's defaults; LaTRO's groups with no stopped rationale;
a run that trained nothing. CPU, tiny models; subprocesses only for torchrun."""
import json
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch

import coconut
import configurator
import latro
import parallel
import preflight
import run as run_module
from configurator import ConfigError, UserError
from inprocess import COCONUT_TINY, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
TINY = COCONUT_TINY + ["--learning_rate=0.01"]
# max_latent_stage=1: stage 2 is the final one (every step latent), where best.pt is chosen;
# start_stage=2 trains there at once: one epoch of 2 steps writes ckpt.pt and best.pt
FINAL = ["--start_stage=2", "--num_epochs=1"]
# latro.py's tiny run (tests/test_latro_script.py's TINY, without dropout and with a shorter
# warm-up)
LATRO_TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--n_train=64", "--n_val=8",
              "--n_test=8", "--sft_steps=10", "--sft_batch_size=8", "--sft_eval_interval=100",
              "--sft_target_acc=0", "--latro_steps=6", "--batch_size=2", "--rloo_k=4",
              "--micro_batch_size=4", "--max_rationale_tokens=12", "--max_new_tokens=16",
              "--maj_k=2", "--eval_interval=2", "--export_hf=False"]
STEP_LINE = re.compile(r"^step \d+/\d+ ", re.M)


def coconut_run(args, out_dir):
    """coconut.py on the tiny run plus args, in this process (tests/inprocess.py)."""
    return run_main("coconut.py", TINY + [f"--out_dir={out_dir}", *args])


def latro_run(args, out_dir):
    return run_main("latro.py", LATRO_TINY + [f"--out_dir={out_dir}", *args])


def refused(result, message):
    """A run that ended with a UserError holding `message` and took no optimizer step."""
    assert result.code == 1 and result.error is not None, result.out[-2000:]
    assert message in str(result.error), str(result.error)
    assert not STEP_LINE.search(result.out), result.out[-2000:]
    return str(result.error)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny coconut runs trained to the final stage, seeds 0 and 1: {seed: (out_dir, stdout)}.
    Tests copy a directory before changing anything in it."""
    runs = {}
    for seed in (0, 1):
        d = tmp_path_factory.mktemp(f"seed{seed}")
        r = coconut_run(FINAL + [f"--seed={seed}"], d)
        assert r.code == 0, (r.error, r.out[-2000:])
        assert (d / "ckpt.pt").is_file() and (d / "best.pt").is_file()
        runs[seed] = d, r.out
    return runs


def copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("run.lock"))
    return dst


# ---- 1. --overwrite=True and init_from ----------------------------------------------------------

def test_overwrite_never_deletes_the_checkpoint_the_run_starts_from(trained, tmp_path):
    d = copy_run(trained[0][0], tmp_path / "run")
    before = {name: (d / name).read_bytes() for name in ("ckpt.pt", "best.pt")}
    r = coconut_run([f"--init_from={d / 'best.pt'}", "--overwrite=True"], d)
    message = refused(r, "--overwrite=True would delete")
    assert "best.pt" in message
    # nothing was deleted, not even the ckpt.pt the run does not read: the refusal comes first
    assert {name: (d / name).read_bytes() for name in before} == before


# ---- 2. ranks that disagree ----------------------------------------------------------------------

def test_ranks_with_different_configurations_are_refused_naming_the_key_and_both_values(tmp_path):
    cfg = tmp_path / "per_rank.py"
    cfg.write_text('import os\nlearning_rate = 0.01 * (1 + int(os.environ["RANK"]))\n')
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "coconut.py", *COCONUT_TINY, str(cfg),
                        f"--out_dir={tmp_path / 'out'}", "--ddp_timeout=60"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0, p.stdout[-2000:]
    assert ("the ranks differ in their configuration: learning_rate is 0.01 on rank 0 and 0.02 "
            "on rank 1") in p.stderr, p.stderr[-3000:]
    # each rank ends with its one-line error (torchrun prefixes the ranks' lines with [rankN]:),
    # not a traceback; the launcher's own report of the failed ranks follows
    ranks = [line for line in p.stderr.splitlines() if line.startswith("[rank")]
    assert sum("error: the ranks differ" in line for line in ranks) == 2, p.stderr[-3000:]
    assert not any("Traceback" in line for line in ranks), p.stderr[-3000:]
    assert not STEP_LINE.search(p.stdout) and "tokenizer:" not in p.stdout


# ---- 3. a checkpoint keeps its word vocabulary ---------------------------------------------------

def qa(i, word=None):
    """A unified-format row whose question holds the word a<i> (or `word`), found nowhere else."""
    w = word or f"a{i}"
    return {"question": f"what follows {w} ?", "steps": [f"{w} leads to b{i % 4} ."],
            "answer": f"c{i % 4}"}


def write_split_files(d, test_rows):
    d.mkdir()
    splits = {"train": [qa(i) for i in range(16)], "val": [qa(i) for i in range(16, 20)],
              "test": test_rows}
    for split, rows in splits.items():
        (d / f"qa_{split}.json").write_text(json.dumps(rows))
    return str(d / "qa_{split}.json")


def test_a_checkpoint_keeps_its_word_vocabulary(tmp_path):
    import vocab
    path = write_split_files(tmp_path / "data", [qa(i) for i in range(20, 24)])
    files = ["--task=json", "--task_options={}", "--n_train=0", "--n_val=0"]
    r = coconut_run(files + FINAL + ["--n_test=0", f"--data_path={path}"], tmp_path / "train")
    assert r.code == 0, (r.error, r.out[-2000:])
    trained_vocab = re.findall(r"vocabulary (\d+)", r.out)
    # the training vocabulary by hand: the fixed templates' words (those of a vocabulary built on
    # no example) plus the data's own: what follows ? leads to . and a0-a23, b0-b3, c0-c3
    fixed = set(vocab.build_tokenizer("words", []).word_list())
    data_words = {"what", "follows", "?", "leads", "to", "."} | {f"a{i}" for i in range(24)}
    data_words |= {f"{x}{k}" for x in "bc" for k in range(4)}
    assert trained_vocab == [str(len(fixed | data_words))]
    # 2 test examples: a vocabulary rebuilt from this data would miss a22 and a23 (2 words fewer)
    best = tmp_path / "train" / "best.pt"
    evaluate = files + ["--eval_only=True", f"--init_from={best}", "--n_test=2"]
    r = coconut_run(evaluate + [f"--data_path={path}"], tmp_path / "eval")
    assert r.code == 0, (r.error, r.out[-2000:])
    assert re.findall(r"vocabulary (\d+)", r.out) == trained_vocab
    assert re.search(r"^test acc \d\.\d{4} \| .* \| 2 examples$", r.out, re.M), r.out[-2000:]
    # a test word the checkpoint's vocabulary never had is refused by name, not read as <unk>
    other = write_split_files(tmp_path / "other", [qa(20, word="zyzzyva"), qa(21)])
    r = coconut_run(evaluate + [f"--data_path={other}"], tmp_path / "eval2")
    message = refused(r, "words not in the word-level vocabulary")
    assert "zyzzyva" in message and "test acc" not in r.out


# ---- 4. another run's best.pt --------------------------------------------------------------------

def test_a_best_pt_of_another_run_is_refused_when_a_resume_starts(trained, tmp_path):
    d = copy_run(trained[0][0], tmp_path / "run1")
    shutil.copyfile(trained[1][0] / "best.pt", d / "best.pt")
    r = coconut_run(FINAL[:1] + ["--num_epochs=2", "--init_from=resume", "--seed=0"], d)
    refused(r, "is not this run's best.pt (other settings: seed)")
    # the same resume with run 1's own best.pt goes on
    shutil.copyfile(trained[0][0] / "best.pt", d / "best.pt")
    r = coconut_run(FINAL[:1] + ["--num_epochs=2", "--init_from=resume", "--seed=0"], d)
    assert r.code == 0 and STEP_LINE.search(r.out), (r.error, r.out[-2000:])


# ---- 5. latro.py's resume and its sampling and measuring settings --------------------------------

@pytest.fixture(scope="module")
def latro_stopped(tmp_path_factory):
    """A tiny latro.py run stopped after step 2 (stop_at_step): its out_dir."""
    d = tmp_path_factory.mktemp("latro_stopped")
    r = latro_run(["--stop_at_step=2"], d)
    assert r.code == 0 and "stopped at step 2 (stop_at_step)" in r.out, (r.error, r.out[-2000:])
    return d


@pytest.mark.parametrize("arg, named", [
    ("--temperature=0.5", "temperature: checkpoint 1.0, now 0.5"),
    ("--max_new_tokens=20", "max_new_tokens: checkpoint 16, now 20"),
    ("--checker=fixed", "checker: checkpoint 'released', now 'fixed'"),
])
def test_latro_resume_refuses_a_changed_sampling_or_measuring_setting(arg, named, latro_stopped):
    r = latro_run(["--init_from=resume", arg], latro_stopped)
    refused(r, named)
    assert "data:" not in r.out  # refused before the data is read


def test_latro_resume_with_the_same_settings_goes_on(latro_stopped, tmp_path):
    d = copy_run(latro_stopped, tmp_path / "run")
    r = latro_run(["--init_from=resume"], d)
    assert r.code == 0, (r.error, r.out[-2000:])
    assert re.findall(r"^step (\d+)/6", r.out, re.M) == ["3", "4", "5", "6"]


# ---- 6. the configurator's numeric and path rules ------------------------------------------------

def configure(script, argv):
    """A script's configuration for argv as its __main__ block checks it (the keys argv gives count
    as given)."""
    return configurator.configure(dict(vars(script)), argv, verbose=False,
                                  renamed=configurator.RENAMED, choices=script.CHOICES,
                                  bounds=script.BOUNDS, notes=getattr(script, "NOTES", None),
                                  check=script.check_config,
                                  own_checkpoints=script is coconut)


@pytest.mark.parametrize("script", [coconut, latro], ids=["coconut", "latro"])
def test_configurator_expands_home_and_refuses_floats_that_cannot_work(script, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert configure(script, ["--out_dir=~/x"])["out_dir"] == f"{tmp_path}/x"
    cases = [(["--learning_rate=1e-400"], "learning_rate=1e-400 is below the smallest float"),
             (["--learning_rate=0.5", "--weight_decay=2"], "learning_rate x weight_decay = 1 >= 1"),
             # (weight_decay=0: coconut.py's 0.01 x 1e38 would break the rule above first)
             (["--learning_rate=1e38", "--weight_decay=0"], "does not fit a float32")]
    for argv, message in cases:
        with pytest.raises(ConfigError) as e:
            configure(script, argv)
        assert message in str(e.value), argv
    # the edge of each: the smallest subnormal float is a number, lr x wd just below 1 and 10 x lr
    # just inside a float32 are allowed
    assert configure(script, ["--learning_rate=5e-324"])["learning_rate"] == 5e-324
    configure(script, ["--learning_rate=0.5", "--weight_decay=1.99"])
    configure(script, ["--learning_rate=3e37", "--weight_decay=0"])
    exiting = tmp_path / "exits.py"
    exiting.write_text("import sys\nlearning_rate = 0.1\nsys.exit(0)\n")
    with pytest.raises(ConfigError) as e:
        configure(script, [str(exiting)])
    assert str(exiting) in str(e.value) and "sys.exit(0)" in str(e.value)


def test_a_config_file_that_exits_ends_the_script_with_one_error_naming_it(tmp_path):
    exiting = tmp_path / "exits.py"
    exiting.write_text("import sys\nsys.exit(0)\n")
    r = run_main("coconut.py", [str(exiting), f"--out_dir={tmp_path / 'out'}"])
    assert r.code == 1 and isinstance(r.error, ConfigError), (r.error, r.out[-2000:])
    assert str(exiting) in str(r.error) and not (tmp_path / "out").exists()


# ---- 7. out_dir paths that cannot hold a run ----------------------------------------------------

@pytest.mark.parametrize("name", ["ckpt.pt", "run.lock"])
def test_a_directory_where_a_run_file_goes_is_refused_at_start(name, tmp_path):
    (tmp_path / "out" / name).mkdir(parents=True)
    (tmp_path / "out" / name / "keep.txt").write_text("mine")
    r = coconut_run(["--num_epochs=1"], tmp_path / "out")
    refused(r, "is a directory, not a file of this project")
    assert name in str(r.error) and "tokenizer:" not in r.out
    assert (tmp_path / "out" / name / "keep.txt").read_text() == "mine"


def test_an_evaluation_with_a_sweep_refuses_an_out_dir_that_cannot_be_created(trained, tmp_path):
    (tmp_path / "afile.txt").write_text("a file, not a directory")
    out = tmp_path / "afile.txt" / "out"
    r = coconut_run(["--eval_only=True", f"--init_from={trained[0][0] / 'best.pt'}",
                     "--thoughts_sweep=0,1"], out)
    refused(r, "cannot be written")
    assert "test acc" not in r.out and "| thoughts |" not in r.out and "val acc" not in r.out


# ---- 8. the memory plan --------------------------------------------------------------------------

def test_the_memory_plan_on_a_cpu_counts_processes_and_prints_a_tiny_model_in_m(trained):
    out = trained[0][1]
    assert re.search(r"memory plan: \d+\.\d\dM parameters, ddp on 1 CPU process,", out), out
    n = float(re.search(r"^model: scratch (\d+\.\d\d)M parameters", out, re.M)[1])
    assert f"memory plan: {n:.2f}M parameters" in out


def test_an_evaluations_memory_plan_holds_no_gradients_optimizer_or_activations():
    n, kv, acts = 1000, 3000, 10 ** 6  # activations far above the rest: they must not count
    plan = preflight.memory_plan(n, mode="ddp", world_size=1, precision="fp32", kv_cache_bytes=kv,
                                 activations_bytes=acts, training=False)
    assert (plan["grads"], plan["optimizer"], plan["activations"]) == (0, 0, 0)
    # fp32 weights, 4 bytes each; generation alone: no gathered copy under DDP, the KV cache
    assert plan["weights"] == 4000 and plan["gathered"] == 0
    assert plan["total"] == 4000 + max(0 + 3000, 0) == 7000
    # FSDP on 4 ranks, bf16: a quarter of the fp32 weights, the whole model gathered in bf16
    plan = preflight.memory_plan(n, mode="fsdp", world_size=4, precision="bf16",
                                 kv_cache_bytes=kv, activations_bytes=acts, grad_accum=4,
                                 training=False)
    assert (plan["grads"], plan["optimizer"], plan["activations"]) == (0, 0, 0)
    assert plan["weights"] == 1000 and plan["gathered"] == 2000
    assert plan["total"] == 1000 + max(2000 + 3000, 0) == 6000
    # the same plan for training counts them: gradients, AdamW's two moments, the activations
    train = preflight.memory_plan(n, mode="ddp", world_size=1, precision="fp32",
                                  kv_cache_bytes=kv, activations_bytes=acts)
    assert (train["grads"], train["optimizer"]) == (4000, 8000)
    assert train["total"] == 4000 + 4000 + 8000 + max(3000, acts)


# ---- 9. divergence before any checkpoint ---------------------------------------------------------

def test_a_diverging_step_before_any_checkpoint_says_none_was_written(tmp_path):
    r = coconut_run(["--num_epochs=2", "--learning_rate=1e30", "--weight_decay=0",
                     "--ckpt_interval=0"], tmp_path)
    assert r.code == 1 and r.error is not None, r.out[-2000:]
    message = str(r.error)
    assert "training diverged" in message and "no checkpoint was written yet" in message
    assert "keeps the last good state" not in message
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "best.pt").exists()


# ---- 10. Run.end and DDP ranks -------------------------------------------------------------------

def test_run_end_raises_when_ddp_ranks_hold_different_weights(monkeypatch, capsys):
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(parallel, "distributed", lambda: True)
    monkeypatch.setattr(run_module.dist, "get_world_size", lambda: 2)
    restored = []
    stand_in = lambda fsdp: types.SimpleNamespace(
        stop=types.SimpleNamespace(restore=lambda: restored.append(True)),
        config={"fsdp": fsdp})
    monkeypatch.setattr(parallel, "ranks_identical", lambda m: False)
    with pytest.raises(RuntimeError, match="different weights"):
        run_module.Run.end(stand_in(False), model)
    # FSDP ranks hold different shards by design: no check
    run_module.Run.end(stand_in(True), model)
    monkeypatch.setattr(parallel, "ranks_identical", lambda m: True)
    capsys.readouterr()
    run_module.Run.end(stand_in(False), model)
    assert "parameters identical" in capsys.readouterr().out
    assert restored == [True] * 3  # a signal acts at once again, in each case


def test_run_end_restores_the_signal_handlers_of_a_real_stop_request():
    import signal
    handler = signal.getsignal(signal.SIGTERM)
    stand_in = types.SimpleNamespace(stop=run_module.StopRequest(), config={"fsdp": False})
    assert signal.getsignal(signal.SIGTERM) != handler
    run_module.Run.end(stand_in, torch.nn.Linear(2, 2))  # one process: no DDP check
    assert signal.getsignal(signal.SIGTERM) == handler


# ---- 11. a pretrained init_from and the CPU demo's defaults --------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny GPT-2 and a word vocabulary over latro.py's tiny modsum data, saved the Hugging Face
    way (save_pretrained)."""
    import data
    import vocab
    from model import load_model
    path = tmp_path_factory.mktemp("tiny_hf")
    sizes = dict(train=64, val=8, test=8)
    splits = data.load_splits("modsum", (sizes["train"], sizes["val"], sizes["test"]), seed=1337)
    tok = vocab.build_tokenizer("words", [ex for exs in splits.values() for ex in exs])
    torch.manual_seed(0)
    load_model("scratch", len(tok), n_layer=1, n_head=2, n_embd=32, block_size=256,
               bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_pretrained_init_from_refuses_the_cpu_demos_learning_rate(hf_dir):
    with pytest.raises(UserError) as e:
        configure(coconut, [f"--init_from={hf_dir}"])
    assert "is a pretrained model and learning_rate=0.001 is the CPU demo's" in str(e.value)
    configure(coconut, [f"--init_from={hf_dir}", "--learning_rate=1e-4"])
    # an evaluation trains nothing: no learning rate needed
    configure(coconut, [f"--init_from={hf_dir}", "--eval_only=True"])
    with pytest.raises(UserError) as e:
        configure(latro, [f"--init_from={hf_dir}"])
    assert "is a pretrained model" in str(e.value)
    assert "an SFT warm-up of 2000 steps" in str(e.value)
    # one of the two given is not enough
    for argv in (["--learning_rate=1e-6"], ["--sft_steps=0"]):
        with pytest.raises(UserError, match="is a pretrained model and the defaults are the CPU "
                                            "demo's"):
            configure(latro, [f"--init_from={hf_dir}", *argv])
    configure(latro, [f"--init_from={hf_dir}", "--learning_rate=1e-6", "--sft_steps=0"])
    configure(latro, [f"--init_from={hf_dir}", "--learning_rate=1e-6", "--sft_epochs=1"])


# ---- 12. LaTRO's groups with no stopped rationale ------------------------------------------------

def test_latro_says_when_a_group_had_no_stopped_rationale(tmp_path):
    # rationales of at most 2 tokens: a tiny model stops some groups' rationales, not all
    r = latro_run(["--max_rationale_tokens=2"], tmp_path)
    assert r.code == 0, (r.error, r.out[-2000:])
    lines = re.findall(r"^step (\d+)/6 \| .*\| stopped (\d+)%( \(no stop in (\d+)/2 groups\))? "
                       r"\| len", r.out, re.M)
    assert [int(s) for s, *_ in lines] == [1, 2, 3, 4, 5, 6], r.out[-3000:]
    stuck = {int(step): int(k) for step, _, note, k in lines if note}
    assert stuck and all(0 < k <= 2 for k in stuck.values())
    m = len(stuck)
    assert f"{m} of 6 steps had a group in which no rationale stopped" in r.out
    assert r.out.count("no stop in") == m
    # 2 groups of K=4: k groups with no stop leave at most (2 - k) x 4 stopped rationales of 8,
    # and no such group means at least one stopped rationale in each group (2 of 8)
    for step, pct, note, k in lines:
        k = int(k) if note else 0
        assert int(pct) <= 100 * (2 - k) * 4 / 8 + 1
        assert k or int(pct) >= 100 * 2 / 8 - 1
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    counts = {row["step"]: row["no_stop_groups"] for row in rows if "reward" in row}
    assert counts == {s: stuck.get(s, 0) for s in range(1, 7)}


# ---- 13. a run that trained nothing --------------------------------------------------------------

def test_a_run_that_trained_nothing_is_not_called_an_sft_baseline(hf_dir, tmp_path):
    r = run_main("latro.py", LATRO_TINY + [
        f"--init_from={hf_dir}", "--sft_steps=0", "--latro_steps=0", "--learning_rate=1e-4",
        f"--out_dir={tmp_path}"])
    assert r.code == 0, (r.error, r.out[-2000:])
    assert re.search(r"^no training \| test acc ", r.out, re.M), r.out[-2000:]
    assert "SFT baseline" not in r.out and "after LaTRO" not in r.out
    assert not STEP_LINE.search(r.out) and not re.search(r"^sft \d", r.out, re.M)
