"""model.py: loading, target log-probs, KV-cached decoding and checkpoints."""
import inspect
import logging
import warnings

import pytest
import torch

from model import (generate, left_pad, load_checkpoint, load_model, position_ids_from_mask, sample_next,
                   save_checkpoint, token_logprobs, backbone, cache_kwargs, output_cache)

V = 40

def tiny(arch):
    torch.manual_seed(0)
    m = load_model("scratch", V, arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=64, eos_id=1, pad_id=0)
    with torch.no_grad():  # a random model with small weights repeats one token; sharpen it so decoding varies
        for p in m.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return m.eval()

def left_padded():
    ids = torch.tensor([[0, 0, 0, 5, 9, 3], [7, 2, 8, 4, 6, 11], [0, 12, 13, 14, 15, 16]])
    lengths = torch.tensor([3, 6, 5])
    mask = (torch.arange(6)[None] >= (6 - lengths)[:, None]).long()
    return ids, mask

def greedy_uncached(m, prompt, n, eos):
    """Batch 1, no cache: re-encode the whole sequence for each new token (the slow reference)."""
    seq, out = prompt[None], []
    for _ in range(n):
        nxt = m(seq).logits[0, -1].argmax()
        out.append(nxt.item())
        if nxt.item() == eos:
            break
        seq = torch.cat([seq, nxt.view(1, 1)], 1)
    return out

def test_left_pad_puts_last_tokens_in_the_last_column():
    ids, mask = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]

def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_cached_greedy_equals_batch1_uncached(arch):
    m = tiny(arch)
    ids, mask = left_padded()
    eos = 1
    toks, stopped = generate(m, ids, mask, 12, stop_sequences=[[eos]], pad_id=0)
    distinct = set()
    for b in range(ids.shape[0]):
        ref = greedy_uncached(m, ids[b][mask[b].bool()], 12, eos)
        got = toks[b].tolist()[:len(ref)]
        assert got == ref
        assert all(t == 0 for t in toks[b].tolist()[len(ref):])  # pad after the stop
        assert bool(stopped[b]) == (ref[-1] == eos)
        distinct |= set(ref)
    assert len(distinct) > 2  # the check is not vacuous: decoding produced varied tokens

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_token_logprobs_match_full_log_softmax(arch):
    m = tiny(arch)
    ids, mask = left_padded()
    pos = position_ids_from_mask(mask)
    hidden = backbone(m)(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    targets = ids.roll(-1, 1)
    want = m(input_ids=ids, attention_mask=mask, position_ids=pos).logits.log_softmax(-1)
    want = want.gather(-1, targets[..., None]).squeeze(-1)
    sel = mask.bool() & (torch.arange(6) < 5)
    got = token_logprobs(m, hidden, targets, sel)
    assert got.dtype == torch.float32
    assert torch.allclose(got[sel], want[sel], atol=1e-5)
    assert (got[~sel] == 0).all()

def test_early_stop_equals_no_early_stop_cut_at_first_stop():
    m = tiny("gpt2")
    ids, mask = left_padded()
    stops = [[3], [5, 7]]  # a single token and a two-token stop sequence
    g = torch.Generator().manual_seed(0)
    early, stopped = generate(m, ids, mask, 20, stop_sequences=stops, pad_id=0, temperature=1.0, generator=g)
    g = torch.Generator().manual_seed(0)
    full, _ = generate(m, ids, mask, 20, stop_sequences=[], pad_id=0, temperature=1.0, generator=g)
    for b in range(ids.shape[0]):
        row = full[b].tolist()
        ends = [i + 1 for i in range(len(row)) if row[i] == 3 or row[max(0, i - 1):i + 1] == [5, 7]]
        cut = ends[0] if ends else len(row)
        assert early[b].tolist()[:cut] == row[:cut]
        assert all(t == 0 for t in early[b].tolist()[cut:])
        assert bool(stopped[b]) == bool(ends)
    assert stopped.any()  # at least one row exercised the early stop

def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 0.7, g).item() for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are never drawn
    assert sample_next(logits, 0.0, 1.0, None).item() == 0

def test_save_pretrained_roundtrip(tmp_path):
    m = tiny("llama")
    m.save_pretrained(tmp_path / "hf")
    m2 = load_model(str(tmp_path / "hf"), V).eval()  # the path users take for a local directory
    ids, mask = left_padded()
    assert torch.equal(m(input_ids=ids, attention_mask=mask).logits, m2(input_ids=ids, attention_mask=mask).logits)
    assert m2.config._attn_implementation == "sdpa"
    m3 = load_model(str(tmp_path / "hf"), V + 3)  # new special tokens get embedding rows
    assert m3.get_input_embeddings().weight.shape[0] == V + 3

def test_unknown_arch_and_file_init_from(tmp_path):
    with pytest.raises(ValueError, match="arch='bert'"):
        load_model("scratch", V, arch="bert")
    f = tmp_path / "ckpt.pt"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_model(str(f), V)

def test_checkpoint_atomic_and_corrupt(tmp_path):
    path = str(tmp_path / "out" / "ckpt.pt")
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "step": 7, "config": {"lr": 1e-4}})
    ck = load_checkpoint(path)
    assert ck["step"] == 7 and torch.equal(ck["model"]["w"], torch.ones(3))
    assert not (tmp_path / "out" / "ckpt.pt.tmp").exists()
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])  # a crash mid-copy
    with pytest.raises(RuntimeError, match="corrupt or truncated"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cache_passed_under_the_name_the_installed_transformers_expects(arch, monkeypatch):
    # transformers renamed past_key_values= to cache= (5.24 warns that the old name goes in 5.40;
    # 5.17 only knows past_key_values=). The name we pass must be the one in the forward's
    # signature, and decoding must not log or warn about a deprecated name.
    m = tiny(arch)
    for module in (m, backbone(m)):
        (name,) = cache_kwargs(module, None)
        assert name in inspect.signature(type(module).forward).parameters
    messages = []
    def record(self, msg, *args, **kwargs):
        messages.append(str(msg))
    monkeypatch.setattr(logging.Logger, "warning_once", record)
    monkeypatch.setattr(logging.Logger, "warning", record)
    ids, mask = left_padded()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        toks, _ = generate(m, ids, mask, 4, stop_sequences=[], pad_id=0)
        out = m(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(m, None))
        cache = output_cache(out)
    messages += [str(w.message) for w in caught]
    assert not [msg for msg in messages if "past_key_values" in msg or "deprecat" in msg], messages
    assert toks.shape == (3, 4) and cache.get_seq_length() == ids.shape[1]

# -----------------------------------------------------------------------------
# checkpoint writes that survive interruption; out_dir rules; the stop flag

import os
import re
import signal
import subprocess
import sys
import time

from configurator import UserError
from model import StopRequest, prepare_out_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
from model import save_checkpoint
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

HOLDER = """
import sys, time
from model import prepare_out_dir
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
        # Python runs a signal's handler in the main thread at its next check, which may come a moment after
        # os.kill returns (the kernel can deliver the signal to another of torch's threads): sleep, which
        # the signal interrupts, until it has run
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
from model import StopRequest, all_sum, end_distributed, ranks_identical
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
# the cross-rank helpers: a sum over ranks; the same weights on both ranks, then one weight 1e-6 apart
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
    # the two ranks share one stdout pipe, so their lines can interleave: find the reports, not lines
    reports = sorted(re.findall(r"rank (\d): (\d+) steps, own signal (None|\d+)", r.stdout))
    assert reports == [("0", "3", "None"), ("1", "3", "15")], r.stdout
    # model.all_sum and model.ranks_identical, as both scripts use them, then end_distributed
    helpers = sorted(re.findall(r"rank (\d): sum (\d+\.\d+), identical (True|False) (True|False)", r.stdout))
    assert helpers == [("0", "3.0", "True", "False"), ("1", "3.0", "True", "False")], r.stdout

def test_check_same_run_names_every_differing_key():
    from model import check_same_run
    saved = {"task": "prosqa", "n_layer": 2, "seed": 0, "lr": 1e-4}
    check_same_run(saved, {**saved, "lr": 3e-4}, ("task", "n_layer", "seed"))  # lr may change
    message = r"other settings \(n_layer: checkpoint 2, now 4; seed: checkpoint <absent>, now 1\)"
    with pytest.raises(UserError, match=message):
        now = {"task": "prosqa", "n_layer": 4, "seed": 1}
        check_same_run({"task": "prosqa", "n_layer": 2}, now, ("task", "n_layer", "seed"))

def test_nonfinite_names_finds_nan_and_inf_but_not_integer_tensors():
    from model import nonfinite_names
    m = tiny("gpt2")
    assert nonfinite_names(m.named_parameters()) == []
    with torch.no_grad():
        m.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
        m.lm_head.weight[1, 1] = float("inf")  # tied to the input embedding
    named = list(m.named_parameters()) + [("rng", torch.get_rng_state())]
    assert nonfinite_names(named) == ["transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight"]
