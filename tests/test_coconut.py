"""coconut.py: stage layouts, the cached latent forward, latent generation, and the training script end to end."""
import os
import subprocess
import sys

import pytest
import torch

from coconut import (Coconut, anchor, check_config, collate, generate, latent_forward, layout, marker_ids,
                     stage_of)
from data import build_tokenizer
from model import backbone, load_model, position_ids_from_mask

V, PAD, EOS, BOT, LAT, EOT = 40, 0, 1, 37, 38, 39
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def tiny(arch, sharpen=1.0, dropout=0.0):
    torch.manual_seed(0)
    m = load_model("scratch", V, arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=64, dropout=dropout,
                   eos_id=EOS, pad_id=PAD)
    with torch.no_grad():  # a random tiny model repeats one token; larger weights make greedy decoding vary
        for p in m.parameters():
            p.mul_(sharpen if p.dim() > 1 else 1.0)
    return m.eval()

def naive_hidden(model, input_ids, mask, latent_id, detach=False, upto=None):
    """Reference: re-run the WHOLE sequence once per thought column (those before `upto`), no cache, then once
    more for the result."""
    emb = model.get_input_embeddings()(input_ids)
    pos = position_ids_from_mask(mask)
    cols = sorted(c for c in set((input_ids == latent_id).nonzero()[:, 1].tolist()) if upto is None or c < upto)
    for c in cols:
        h = backbone(model)(inputs_embeds=emb, attention_mask=mask, position_ids=pos).last_hidden_state
        fed = h[:, c - 1].detach() if detach else h[:, c - 1]
        emb = emb.clone()
        emb[:, c] = torch.where(input_ids[:, c, None] == latent_id, fed, emb[:, c])
    return backbone(model)(inputs_embeds=emb, attention_mask=mask, position_ids=pos).last_hidden_state

def ragged_batch():
    """Left-padded rows of different lengths and thought counts (0..3), first thoughts column-aligned."""
    rows = [([3, 4, 5, BOT, LAT, LAT, EOT], [6, 7, EOS]), ([3, 4, 5, 6, 7, 8, 9, BOT, LAT, EOT], [6, EOS]),
            ([5, BOT, LAT, LAT, LAT, EOT], [9, 9, 9, EOS]), ([5, 6, BOT, EOT], [9, EOS])]
    return collate(rows, [anchor(p, LAT) for p, _ in rows], PAD)

# ---- the curriculum: stage-k sequences and labels

Q, STEPS, A = [10, 11], [[20], [21, 22], [23]], [30, EOS]
KW = dict(c_thought=2, max_latent_stage=2, pad_latent_to_max=True, n_pause=3, special=(BOT, LAT, EOT))

@pytest.mark.parametrize("stage,prompt,target", [
    (0, Q + [BOT, EOT], [20, 21, 22, 23, 30, EOS]),                  # stage 0: CoT with empty markers
    (1, Q + [BOT] + [LAT] * 2 + [EOT], [21, 22, 23, 30, EOS]),        # first step -> c_thought thoughts
    (2, Q + [BOT] + [LAT] * 4 + [EOT], [23, 30, EOS]),                # stage == max_latent_stage: steps[2:] kept
    (3, Q + [BOT] + [LAT] * 4 + [EOT], [30, EOS]),                    # past it: all steps gone, thoughts capped
    (9, Q + [BOT] + [LAT] * 4 + [EOT], [30, EOS]),
])
def test_coconut_stage_layout(stage, prompt, target):
    assert layout(Q, STEPS, A, stage, method="coconut", **KW) == (prompt, target)
    assert layout(Q, STEPS, A, stage, method="pause_as_thought", **KW) == (prompt, target)  # same data
    ids, mask, labels = collate([(prompt, target)], [anchor(prompt, LAT)], PAD)
    assert ids[0].tolist() == prompt + target and mask.all()
    assert labels[0].tolist() == [-100] * len(prompt) + target     # no loss on question, markers, thoughts

def test_pad_latent_to_max_both_ways():
    one_step = [[20]]
    kw = dict(KW, max_latent_stage=3)
    assert layout(Q, one_step, A, 2, method="coconut", **kw)[0] == Q + [BOT] + [LAT] * 4 + [EOT]  # 2 * c
    kw["pad_latent_to_max"] = False
    assert layout(Q, one_step, A, 2, method="coconut", **kw)[0] == Q + [BOT] + [LAT] * 2 + [EOT]  # min(2, 1) * c
    assert layout(Q, one_step, A, 5, method="coconut", **kw) == (Q + [BOT] + [LAT] * 2 + [EOT], A)

def test_baseline_layouts():
    for stage in (0, 1, 3):
        assert layout(Q, STEPS, A, stage, method="cot", **KW) == (Q, [20, 21, 22, 23, 30, EOS])
        assert layout(Q, STEPS, A, stage, method="no_cot", **KW) == (Q, A)
        assert layout(Q, STEPS, A, stage, method="pause", **KW) == (Q + [LAT] * 3, A)
    assert layout(Q, STEPS, A, 1, method="no_thoughts", **KW) == (Q, [21, 22, 23, 30, EOS])  # steps deleted
    assert layout(Q, STEPS, A, 3, method="no_thoughts", **KW) == (Q, A)
    # inference with a chosen number of thoughts; methods without thoughts ignore it
    assert layout(Q, STEPS, [], 3, method="coconut", **KW, n_thoughts=6)[0] == Q + [BOT] + [LAT] * 6 + [EOT]
    assert layout(Q, STEPS, [], 0, method="cot", **KW, n_thoughts=6)[0] == Q

def test_stage_schedule():
    assert [stage_of(e, 0, 3, 3) for e in range(7)] == [0, 0, 0, 1, 1, 1, 2]
    assert [stage_of(e, 1, 2, 3) for e in range(4)] == [1, 1, 2, 2]  # continuing from a CoT run
    assert [stage_of(e, 0, 1, 2) for e in range(6)] == [0, 1, 2, 3, 3, 3]  # capped past max_latent_stage
    assert stage_of(0, 99, 5, 6) == 7                                 # "w/o curriculum": the final stage at once

def test_marker_ids_are_bot_latent_eot():
    # regression: data.py lists the markers as (start, end, latent); layout() takes (bot, latent, eot)
    tok = build_tokenizer("words", [{"question": "Tom is a wumpus.", "steps": [], "answer": "yes"}])
    names = [tok.decode([i], skip_special_tokens=False) for i in marker_ids(tok)]
    assert names == ["<|start-latent|>", "<|latent|>", "<|end-latent|>"]

def test_collate_aligns_first_thought_column():
    ids, mask, labels = ragged_batch()
    cols = [(row == LAT).nonzero().flatten().tolist() for row in ids]
    assert [c[0] for c in cols if c] == [8, 8, 8]                     # one column c0 for every row's thought 1
    assert all(c == list(range(8, 8 + len(c))) for c in cols)         # thought j in column c0 + j
    for row, m, lab in zip(ids, mask, labels):                         # pad is masked and never labelled
        assert (row[m == 0] == PAD).all() and (lab[m == 0] == -100).all()

# ---- the latent forward

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cached_forward_equals_naive_rerun(arch):
    # each pass sees exactly what the naive loop sees: same earlier positions (cache), same thought vectors,
    # same position ids and masks; only the order of computation differs
    m = tiny(arch)
    ids, mask, _ = ragged_batch()
    with torch.no_grad():
        got, _ = latent_forward(m, ids, mask, LAT)
        ref = naive_hidden(m, ids, mask, LAT)
    real = mask.bool()
    assert (got - ref)[real].abs().max().item() <= 1e-5

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_zero_thoughts_is_plain_forward(arch):
    m = tiny(arch)
    ids, mask, labels = ragged_batch()
    ids = ids.masked_fill(ids == LAT, 5)                              # no thoughts: latent_forward is one pass
    got, _ = latent_forward(m, ids, mask, LAT)
    out = m(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), output_hidden_states=True)
    assert (got - out.hidden_states[-1])[mask.bool()].abs().max().item() <= 1e-5
    loss = Coconut(m, LAT)(ids, mask, labels)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert abs(loss.item() - ref.item()) <= 1e-5

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradient_flows_through_thoughts(arch):
    # the loss sits after the thoughts; its gradient must equal the naive (no-detach) chain's, and differ from
    # the gradient with the thought vectors detached: the chain of thoughts itself carries gradient
    m = tiny(arch).train()
    ids, mask, labels = ragged_batch()
    def grads(hidden_fn):
        m.zero_grad()
        hidden = hidden_fn()
        tgt, keep = labels[:, 1:], labels[:, 1:] != -100
        logits = m.get_output_embeddings()(hidden[:, :-1][keep])
        torch.nn.functional.cross_entropy(logits, tgt[keep]).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    cached = grads(lambda: latent_forward(m, ids, mask, LAT)[0])
    naive = grads(lambda: naive_hidden(m, ids, mask, LAT))
    detached = grads(lambda: naive_hidden(m, ids, mask, LAT, detach=True))
    assert max((cached[n] - naive[n]).abs().max().item() for n in naive) <= 1e-5
    assert max((cached[n] - detached[n]).abs().max().item() for n in naive) > 1e-4
    wte = m.get_input_embeddings().weight
    assert cached[next(n for n, p in m.named_parameters() if p is wte)][[3, 4, 5]].abs().sum() > 0  # question rows

# ---- generation

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_cached_generation_equals_batch1_uncached(arch):
    m = tiny(arch, sharpen=8.0)
    prompts = [[3, 4, 5, BOT, LAT, LAT, EOT], [7, 8, 9, 10, 11, 12, BOT, LAT, LAT, EOT], [13, BOT, LAT, LAT, EOT]]
    tokens, n_gen = generate(m, prompts, LAT, EOS, PAD, 10, "cpu")
    seen = set()
    for p, row, n in zip(prompts, tokens.tolist(), n_gen.tolist()):
        seq, ref = torch.tensor([p]), []
        for _ in range(10):  # batch 1, no cache, full re-run per token; a generated <latent> is a plain token
            nxt = m.get_output_embeddings()(naive_hidden(m, seq, torch.ones_like(seq), LAT, upto=len(p))[0, -1]).argmax().item()
            ref.append(nxt)
            if nxt == EOS:
                break
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
        assert row[:len(ref)] == ref and n == len(ref)
        seen |= set(ref)
    assert len(seen) > 2                                                # not a vacuous comparison

# ---- configuration checks (pure) and the script end to end

def test_bad_config_fails_with_clear_message():
    ok = dict(method="coconut", c_thought=1, epochs_per_stage=1, max_latent_stage=2, uniform_prob=0.0,
              reset_optimizer="stage", batch_size=128, micro_batch_size=32)
    assert check_config(ok, 2) == 2                                    # 128 = 32 x 2 accumulation x 2 ranks
    for bad, msg in [(dict(batch_size=100), "multiple of micro_batch_size"), (dict(method="coconat"), "unknown"),
                     (dict(c_thought=0), "c_thought"), (dict(reset_optimizer="always"), "reset_optimizer")]:
        with pytest.raises(ValueError, match=msg):
            check_config({**ok, **bad}, 2)

TINY = ["--task=prosqa_small", "--task_options={'symbolic': True, 'min_nodes': 6, 'max_nodes': 8, 'min_hops': 1, "
        "'max_hops': 2}", "--n_train=16", "--n_val=4", "--n_test=4", "--n_layer=1", "--n_head=2", "--n_embd=32",
        "--batch_size=8", "--micro_batch_size=4", "--max_latent_stage=1", "--max_new_tokens=4", "--probe=0",
        "--learning_rate=0.01"]

def run_script(args, out_dir, nproc=1):
    launcher = [sys.executable, "coconut.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "coconut.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(launcher + TINY + [f"--out_dir={out_dir}"] + args, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)

def step_losses(stdout):
    return [float(line.split("| loss ")[1].split()[0]) for line in stdout.splitlines() if line.startswith("step ")]

def weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]

def test_ddp_two_ranks_match_one_process(tmp_path):
    # same global batch of 8: one process with 2 micro-steps of 4 == two ranks with one micro-step of 4 each
    # (rank r's block of the global batch is micro-step r of the single process); epoch 1 has thoughts
    args = ["--num_epochs=2", "--epochs_per_stage=1", "--dropout=0.0"]
    one = run_script(args, tmp_path / "one")
    two = run_script(args, tmp_path / "two", nproc=2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert "parameters identical on 2 ranks: True" in two.stdout
    l1, l2 = step_losses(one.stdout), step_losses(two.stdout)
    assert len(l1) == len(l2) == 4 and max(abs(a - b) for a, b in zip(l1, l2)) < 1e-4
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4

def test_resume_equals_straight_run_and_corrupt_checkpoint_fails(tmp_path):
    # dropout on: each epoch reseeds from (seed, epoch, rank), data order from (seed, epoch), optimizer restored
    args = ["--epochs_per_stage=2", "--start_stage=1", "--dropout=0.1"]
    straight = run_script(args + ["--num_epochs=2"], tmp_path / "a")
    half = run_script(args + ["--num_epochs=1"], tmp_path / "b")
    resumed = run_script(args + ["--num_epochs=2", "--init_from=resume"], tmp_path / "b")
    for r in (straight, half, resumed):
        assert r.returncode == 0, r.stderr[-2000:]
    assert step_losses(half.stdout) + step_losses(resumed.stdout) == step_losses(straight.stdout)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ckpt = tmp_path / "b" / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])                          # a truncated write
    bad = run_script(args + ["--num_epochs=3", "--init_from=resume"], tmp_path / "b")
    assert bad.returncode != 0 and "corrupt or truncated" in bad.stderr

def test_bad_config_stops_before_training(tmp_path):
    r = run_script(["--batch_size=10"], tmp_path)
    assert r.returncode != 0 and "must be a multiple of micro_batch_size" in r.stderr
    assert not step_losses(r.stdout)

@pytest.mark.parametrize("preset", sorted(f for f in os.listdir(os.path.join(ROOT, "config")) if f.startswith("coconut_")))
def test_presets_parse_and_divide(preset):
    # every key exists with the right type, and the global batch divides on 1 and on 4 GPUs (the released count);
    # overlays (method files) sit on a task preset, so every file is read after config/coconut_prosqa.py
    import coconut
    from configurator import configure
    files = [os.path.join(ROOT, "config", f) for f in ("coconut_prosqa.py", preset)]
    cfg = configure(dict(vars(coconut)), files, verbose=False)
    assert check_config(cfg, 1) == 4 and check_config(cfg, 4) == 1
