"""coconut.py: stage layouts, the cached latent forward, latent generation, and the training script
end to end."""
import json
import os

import pytest
import torch

from coconut import (Coconut, Curriculum, collate, generate_answers, latent_forward, layout,
                     naive_latent_forward)
from configurator import counts
from inprocess import COCONUT_TINY, check_rules_of, run_main
from model import (autocast_ctx, backbone, copy_token_rows, lm_head, load_model,
                   position_ids_from_mask)
from vocab import build_tokenizer, encode_example, marker_ids, marker_source, markers_present

V, PAD, EOS, BOT, LAT, EOT = 40, 0, 1, 37, 38, 39
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def tiny(arch, sharpen=1.0, dropout=0.0):
    torch.manual_seed(0)
    m = load_model("scratch", V, arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=64,
                   dropout=dropout, eos_id=EOS, pad_id=PAD)
    # a random tiny model repeats one token; larger weights make greedy decoding vary
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(sharpen if p.dim() > 1 else 1.0)
    return m.eval()

def detached_thoughts_hidden(model, input_ids, mask, latent_id):
    """The naive chain with every thought vector detached: the same values, but the gradient reaches
    the weights only through the last pass, never back through the thoughts."""
    _, embeds = naive_latent_forward(model, input_ids, mask, latent_id)
    is_thought = (input_ids == latent_id)[..., None]
    fed = torch.where(is_thought, embeds.detach(), model.get_input_embeddings()(input_ids))
    pos = position_ids_from_mask(mask)
    return backbone(model)(inputs_embeds=fed, attention_mask=mask,
                           position_ids=pos).last_hidden_state

def ragged_batch():
    """Left-padded rows of different lengths and thought counts (0..3), first thoughts
    column-aligned."""
    rows = [([3, 4, 5, BOT, LAT, LAT, EOT], [6, 7, EOS]),
            ([3, 4, 5, 6, 7, 8, 9, BOT, LAT, EOT], [6, EOS]),
            ([5, BOT, LAT, LAT, LAT, EOT], [9, 9, 9, EOS]), ([5, 6, BOT, EOT], [9, EOS])]
    return collate(rows, LAT, PAD)

# ---- the curriculum: stage-k sequences and labels

Q, STEPS, A = [10, 11], [[20], [21, 22], [23]], [30, EOS]
KW = dict(c_thought=2, max_latent_stage=2, pad_latent_to_max=True, special=(BOT, LAT, EOT))

@pytest.mark.parametrize("stage,prompt,target", [
    (0, Q + [BOT, EOT], [20, 21, 22, 23, 30, EOS]),      # stage 0: CoT with empty markers
    (1, Q + [BOT] + [LAT] * 2 + [EOT], [21, 22, 23, 30, EOS]),  # first step -> c_thought thoughts
    (2, Q + [BOT] + [LAT] * 4 + [EOT], [23, 30, EOS]),   # stage == max_latent_stage: steps[2:] kept
    (3, Q + [BOT] + [LAT] * 4 + [EOT], [30, EOS]),       # past it: all steps gone, thoughts capped
    (9, Q + [BOT] + [LAT] * 4 + [EOT], [30, EOS]),
])
def test_coconut_stage_layout(stage, prompt, target):
    assert layout(Q, STEPS, A, stage, Curriculum(method="coconut", **KW)) == (prompt, target)
    assert layout(Q, STEPS, A, stage,
                  Curriculum(method="pause_as_thought", **KW)) == (prompt, target)  # same data
    ids, mask, labels = collate([(prompt, target)], LAT, PAD)
    assert ids[0].tolist() == prompt + target and mask.all()
    # no loss on question, markers, thoughts
    assert labels[0].tolist() == [-100] * len(prompt) + target

def released_n_latent(stage, n_steps, max_latent_stage, c, pad, inference):
    """The released rule, restated from its dataset code: training (get_cot_latent_dataset) gives
    stage*c thoughts at a stage <= max_latent_stage whatever the step count, and past it
    max_latent_stage*c, or min(#steps, max)*c without padding; evaluation
    (get_question_latent_dataset) caps at min(max, #steps) without padding, at any stage."""
    if inference:
        cap = max_latent_stage if pad else min(max_latent_stage, n_steps)
        return min(cap, stage) * c
    if stage > max_latent_stage:
        return (max_latent_stage if pad else min(n_steps, max_latent_stage)) * c
    return stage * c

@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("inference", [False, True])
def test_pad_latent_to_max_matches_released_rule(pad, inference):
    # examples with fewer steps than the stage (0, 1, 2 steps at stages up to 5, max_latent_stage 3)
    # are where the two settings differ; layouts must give the released counts and keep
    # steps[stage:] as targets
    kw = dict(KW, max_latent_stage=3, pad_latent_to_max=pad)
    seen = set()
    for n_steps in (0, 1, 2, 4):
        steps = [[20 + i] for i in range(n_steps)]
        for stage in range(6):
            prompt, target = layout(Q, steps, A, stage, Curriculum(method="coconut", **kw),
                                    inference=inference)
            n = released_n_latent(stage, n_steps, 3, 2, pad, inference)
            assert prompt == Q + [BOT] + [LAT] * n + [EOT], (n_steps, stage)
            kept = steps[stage:] if stage <= 3 else []
            assert target == [t for st in kept for t in st] + A
            seen.add(n)
    assert len(seen) > 3

def test_pad_latent_to_max_false_examples():
    # one step, c=2, max_latent_stage=3: training stage 2 still gives 2*2 thoughts (the step count
    # does not cap it), past the last stage min(3, 1)*2, and at inference min(2, 1)*2
    kw = dict(KW, max_latent_stage=3, pad_latent_to_max=False)
    one_step = [[20]]
    assert (layout(Q, one_step, A, 2, Curriculum(method="coconut", **kw))
            == (Q + [BOT] + [LAT] * 4 + [EOT], A))
    assert (layout(Q, one_step, A, 5, Curriculum(method="coconut", **kw))
            == (Q + [BOT] + [LAT] * 2 + [EOT], A))
    assert (layout(Q, one_step, [], 2, Curriculum(method="coconut", **kw), inference=True)[0]
            == Q + [BOT] + [LAT] * 2 + [EOT])

def test_baseline_layouts():
    for stage in (0, 1, 3):
        assert (layout(Q, STEPS, A, stage, Curriculum(method="cot", **KW))
                == (Q, [20, 21, 22, 23, 30, EOS]))
        assert layout(Q, STEPS, A, stage, Curriculum(method="no_cot", **KW)) == (Q, A)
        # pause: max_latent_stage x c_thought = 4 pauses at every stage
        assert layout(Q, STEPS, A, stage, Curriculum(method="pause", **KW)) == (Q + [LAT] * 4, A)
    assert (layout(Q, STEPS, A, 1, Curriculum(method="no_thoughts", **KW))
            == (Q, [21, 22, 23, 30, EOS]))  # steps deleted
    assert layout(Q, STEPS, A, 3, Curriculum(method="no_thoughts", **KW)) == (Q, A)
    # inference with a chosen number of thoughts; methods without thoughts ignore it
    assert (layout(Q, STEPS, [], 3, Curriculum(method="coconut", **KW), n_thoughts=6)[0]
            == Q + [BOT] + [LAT] * 6 + [EOT])
    assert layout(Q, STEPS, [], 0, Curriculum(method="cot", **KW), n_thoughts=6)[0] == Q

def stage_of(epoch, start_stage, epochs_per_stage, max_latent_stage):
    """Curriculum.stage of the coconut method."""
    return Curriculum(method="coconut", c_thought=1, max_latent_stage=max_latent_stage,
                      pad_latent_to_max=True, special=(None,) * 3, start_stage=start_stage,
                      epochs_per_stage=epochs_per_stage).stage(epoch)

def test_stage_schedule():
    assert [stage_of(e, 0, 3, 3) for e in range(7)] == [0, 0, 0, 1, 1, 1, 2]
    assert [stage_of(e, 1, 2, 3) for e in range(4)] == [1, 1, 2, 2]  # continuing from a CoT run
    # capped past max_latent_stage
    assert [stage_of(e, 0, 1, 2) for e in range(6)] == [0, 1, 2, 3, 3, 3]
    assert stage_of(0, 99, 5, 6) == 7                    # "w/o curriculum": the final stage at once

def test_uniform_prob_zero_keeps_every_example_at_its_scheduled_stage():
    from coconut import epoch_order
    n_steps = [3, 1, 5, 0, 2] * 20
    assert epoch_order(0, 0, 2, 0.0, n_steps)[0] == [2] * 100

def test_uniform_prob_one_draws_every_stage_from_zero_to_the_example_steps():
    from coconut import epoch_order
    n_steps = [3, 1, 5, 0, 2] * 40
    got = epoch_order(0, 0, 9, 1.0, n_steps)[0]               # 9: never a drawn stage here
    assert all(0 <= st <= n for st, n in zip(got, n_steps))
    for n in set(n_steps):                                           # each reachable stage is drawn
        assert {st for st, m in zip(got, n_steps) if m == n} == set(range(n + 1))
    half = epoch_order(0, 0, 9, 0.5, n_steps)[0]              # both kinds, about half each
    assert 60 < half.count(9) < 140

def test_epoch_order_depends_on_seed_and_epoch_only():
    from coconut import epoch_order
    n_steps = [2, 3, 1, 4] * 8
    a = epoch_order(0, 3, 1, 0.5, n_steps)
    assert a == epoch_order(0, 3, 1, 0.5, n_steps) and sorted(a[1]) == list(range(32))
    assert (a[1] != epoch_order(0, 4, 1, 0.5, n_steps)[1]
            and a[1] != epoch_order(1, 3, 1, 0.5, n_steps)[1])

@pytest.mark.parametrize("world,accum", [(1, 1), (1, 4), (2, 1), (2, 2), (4, 2)])
def test_rank_blocks_partition_the_global_batch(world, accum):
    from parallel import rank_block
    micro = 3
    batch = list(range(100, 100 + world * accum * micro))
    blocks = [rank_block(batch, r, m, accum, micro) for r in range(world) for m in range(accum)]
    assert all(len(b) == micro for b in blocks)
    assert sorted(i for b in blocks for i in b) == batch                # every example once
    # rank r's micro-step m is micro-step r*accum+m of one process accumulating world*accum blocks
    for r in range(world):
        for m in range(accum):
            assert (rank_block(batch, r, m, accum, micro)
                    == rank_block(batch, 0, r * accum + m, world * accum, micro))

def test_optimizer_resets_exactly_at_the_configured_epochs():
    from coconut import resets_optimizer
    sched = Curriculum(method="coconut", **dict(KW, max_latent_stage=2), start_stage=0,
                       epochs_per_stage=2)
    assert [sched.stage(e) for e in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    at = lambda mode: [e for e in range(8) if resets_optimizer(e, sched, mode)]  # 0 0 1 1 2 2 3 3
    assert at("stage") == [2, 4, 6] and at("epoch") == [1, 2, 3, 4, 5, 6, 7] and at("never") == []
    from_cot = Curriculum(method="coconut", **dict(KW, max_latent_stage=3), start_stage=1,
                          epochs_per_stage=3)
    assert [from_cot.stage(e) for e in range(7)] == [1, 1, 1, 2, 2, 2, 3]
    assert [e for e in range(7) if resets_optimizer(e, from_cot, "stage")] == [3, 6]
    # and a real optimizer's step count: AdamW made anew at those epochs restarts at 0
    p = torch.nn.Parameter(torch.ones(2))
    opt, counts = None, []
    for e in range(8):
        if opt is None or resets_optimizer(e, sched, "stage"):
            opt = torch.optim.AdamW([p], lr=0.1)
        for _ in range(3):
            p.grad = torch.ones(2)
            opt.step()
        counts.append(int(opt.state[p]["step"]))
    assert counts == [3, 6, 3, 6, 3, 6, 3, 6]

def test_marker_ids_are_bot_latent_eot_with_the_released_ids():
    # layout() takes the ids by role (bot, latent, eot); the vocabulary gets them in the released
    # order (start, end, latent: GPT-2 50257, 50258, 50259), so existing checkpoints keep their
    # marker rows
    tok = build_tokenizer("words", [{"question": "Tom is a wumpus.", "steps": [], "answer": "yes"}])
    n = len(tok)
    ids = marker_ids(tok)
    names = [tok.decode([i], skip_special_tokens=False) for i in ids]
    assert names == ["<|start-latent|>", "<|latent|>", "<|end-latent|>"]
    assert ids == (n, n + 2, n + 1)

# ---- the markers: released init, tied and untied heads, the tokenizer's BOS

def negative_logit_gpt2(n_real):
    """A GPT-2-layout model (tied head) whose real-token logits are all about -30, like a pretrained
    model's: the final norm outputs a constant b, and every real row points against b."""
    torch.manual_seed(0)
    m = load_model("scratch", n_real, arch="gpt2", n_layer=1, n_head=2, n_embd=32, block_size=64,
                   eos_id=EOS, pad_id=PAD)
    with torch.no_grad():
        b = torch.randn(32)
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.copy_(b)
        wte = m.get_input_embeddings().weight
        wte.mul_(0.1).sub_(30 * b / b.dot(b))
    return m.eval()

def test_markers_copy_source_row_in_tied_head_and_do_not_raise_the_loss():
    SRC = 12
    special = (BOT, LAT, EOT)                                           # rows 37..39 of V = 40
    copied, fresh = negative_logit_gpt2(V - 3), negative_logit_gpt2(V - 3)
    copy_token_rows(copied, V, special, SRC)
    copy_token_rows(fresh, V, special, None)                # the old default: fresh N(0, 0.02) rows
    for m in (copied, fresh):
        assert m.get_input_embeddings().weight.shape[0] == V
        assert lm_head(m).weight is m.get_input_embeddings().weight    # still tied after the resize
    wte = copied.get_input_embeddings().weight
    assert all(torch.equal(wte[i], wte[SRC]) for i in special)
    # stage 0: markers in the input, loss on the steps and answer; the logits are those of the real
    # vocabulary
    prompt, target = layout(Q, STEPS, A, 0, Curriculum(method="coconut", **KW))
    ids, mask, labels = collate([(prompt, target)], LAT, PAD)
    def losses(m):
        with torch.no_grad():
            logits = m(input_ids=ids, attention_mask=mask).logits[0, :-1]
        keep = labels[0, 1:] != -100
        tgt = labels[0, 1:][keep]
        full = torch.nn.functional.cross_entropy(logits[keep], tgt)
        real = torch.nn.functional.cross_entropy(logits[keep][:, :V - 3], tgt)
        assert abs(Coconut(m, LAT)(ids, mask, labels).item() - full.item()) < 1e-4
        return logits[keep], full.item(), real.item()
    logits, full, real = losses(copied)
    assert logits[:, :V - 3].max().item() < -20                # strongly negative real-token logits
    assert (logits[:, list(special)] <= logits[:, :V - 3].max(-1, keepdim=True).values).all()
    p_src = logits[:, :V - 3].softmax(-1)[:, SRC]
    # 3 more copies of one real token
    assert abs((full - real) - torch.log1p(3 * p_src).mean().item()) < 1e-4
    assert full - real < 0.5
    _, full_fresh, real_fresh = losses(fresh)
    assert full_fresh - real_fresh > 10                        # fresh rows: markers win by ~30 nats

def test_markers_in_untied_head_copy_each_matrix_own_row():
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=V - 3, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                               tie_word_embeddings=False)
    m = AutoModelForCausalLM.from_config(cfg)
    copy_token_rows(m, V, (BOT, LAT, EOT), 7)
    inp, out = m.get_input_embeddings().weight, lm_head(m).weight
    assert inp is not out and inp.shape[0] == out.shape[0] == V
    assert not torch.equal(inp[7], out[7])
    for i in (BOT, LAT, EOT):
        assert torch.equal(inp[i], inp[7]) and torch.equal(out[i], out[7])

def test_markers_present_never_overwrites_trained_rows():
    tok = build_tokenizer("words", [{"question": "Tom is a wumpus.", "steps": [], "answer": "yes"}])
    assert not markers_present(tok, None)                        # a model from scratch or the hub
    assert markers_present(tok, {"markers": False}) is False     # the GSM8k CoT checkpoint
    assert markers_present(tok, {}) is True                      # older checkpoints always had them
    marker_ids(tok)
    assert markers_present(tok, None)                             # an hf/ export with its tokenizer

def test_marker_source_choices_and_errors():
    tok = build_tokenizer("words", [{"question": "Tom is a wumpus << x.", "steps": [],
                                     "answer": "yes"}])
    # pretrained: as released
    assert marker_source(tok, "auto", "openai-community/gpt2") == tok.token_id("<<")
    assert marker_source(tok, "auto", "scratch") is None       # scratch: fresh rows like all others
    assert marker_source(tok, "", "openai-community/gpt2") is None
    assert marker_source(tok, "wumpus", "scratch") == tok.token_id("wumpus")
    with pytest.raises(ValueError, match="marker_init='Tom is'.*not exactly one token"):
        marker_source(tok, "Tom is", "scratch")
    with pytest.raises(ValueError, match="marker_init='zorp'"):
        marker_source(tok, "zorp", "scratch")                         # not in the vocabulary at all
    plain = build_tokenizer("words", [{"question": "Tom is a wumpus.", "steps": [],
                                       "answer": "yes"}])
    with pytest.raises(ValueError, match="marker_init='auto'.*'<<'"):
        marker_source(plain, "auto", "openai-community/gpt2")

def bos_tokenizer():
    """An HF tokenizer whose encode(add_special_tokens=True) prepends <s>, as Llama's does."""
    from tokenizers import Tokenizer as RustTokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from vocab import Tokenizer
    words = "<s> </s> <unk> Tom is a wumpus yes ###".split()
    rust = RustTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    rust.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                        special_tokens=[("<s>", 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
    return Tokenizer(hf)

def test_bos_follows_the_tokenizer():
    ex = {"question": "Tom is a wumpus?", "steps": ["Tom is a wumpus.", "yes."], "answer": "yes"}
    words = build_tokenizer("words", [ex])
    q, steps, answer = encode_example(words, ex)
    assert words.bos_id is not None and words.bos_id not in q  # like GPT-2: the tokenizer adds none
    full = ex["question"] + "\n" + "\n".join(ex["steps"]) + "\n### " + ex["answer"]
    # the released check
    assert q + [t for s in steps for t in s] + answer == words.encode(full) + [words.eos_id]
    llama_like = bos_tokenizer()
    q, steps, _ = encode_example(llama_like, {"question": "Tom is a wumpus", "steps": ["yes"],
                                              "answer": "yes"})
    assert (q[0] == llama_like.bos_id and q.count(llama_like.bos_id) == 1
            and llama_like.bos_id not in steps[0])

def test_collate_aligns_first_thought_column():
    ids, mask, labels = ragged_batch()
    cols = [(row == LAT).nonzero().flatten().tolist() for row in ids]
    assert [c[0] for c in cols if c] == [8, 8, 8]          # one column c0 for every row's thought 1
    assert all(c == list(range(8, 8 + len(c))) for c in cols)         # thought j in column c0 + j
    for row, m, lab in zip(ids, mask, labels):             # pad is masked and never labelled
        assert (row[m == 0] == PAD).all() and (lab[m == 0] == -100).all()

# ---- the latent forward

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cached_forward_equals_naive_rerun(arch):
    # each pass sees exactly what the naive loop sees: same earlier positions (cache), same thought
    # vectors, same position ids and masks; only the order of computation differs
    m = tiny(arch)
    ids, mask, _ = ragged_batch()
    with torch.no_grad():
        got, _ = latent_forward(m, ids, mask, LAT)
        ref, _ = naive_latent_forward(m, ids, mask, LAT)
    real = mask.bool()
    assert (got - ref)[real].abs().max().item() <= 1e-5

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_zero_thoughts_is_plain_forward(arch):
    m = tiny(arch)
    ids, mask, labels = ragged_batch()
    ids = ids.masked_fill(ids == LAT, 5)                   # no thoughts: latent_forward is one pass
    got, _ = latent_forward(m, ids, mask, LAT)
    out = m(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
            output_hidden_states=True)
    assert (got - out.hidden_states[-1])[mask.bool()].abs().max().item() <= 1e-5
    loss = Coconut(m, LAT)(ids, mask, labels)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1),
                                            labels[:, 1:].flatten())
    assert abs(loss.item() - ref.item()) <= 1e-5

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradient_flows_through_thoughts(arch):
    # the loss sits after the thoughts; its gradient must equal the naive (no-detach) chain's, and
    # differ from the gradient with the thought vectors detached: the chain of thoughts itself
    # carries gradient
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
    naive = grads(lambda: naive_latent_forward(m, ids, mask, LAT)[0])
    detached = grads(lambda: detached_thoughts_hidden(m, ids, mask, LAT))
    assert max((cached[n] - naive[n]).abs().max().item() for n in naive) <= 1e-5
    assert max((cached[n] - detached[n]).abs().max().item() for n in naive) > 1e-4
    wte = m.get_input_embeddings().weight
    # question rows
    assert cached[next(n for n, p in m.named_parameters() if p is wte)][[3, 4, 5]].abs().sum() > 0

# ---- generation

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_cached_generation_equals_batch1_uncached(arch):
    m = tiny(arch, sharpen=8.0)
    prompts = [[3, 4, 5, BOT, LAT, LAT, EOT], [7, 8, 9, 10, 11, 12, BOT, LAT, LAT, EOT],
               [13, BOT, LAT, LAT, EOT]]
    tokens, n_gen = generate_answers(m, prompts, LAT, EOS, PAD, 10, "cpu")
    seen = set()
    for p, row, n in zip(prompts, tokens.tolist(), n_gen.tolist()):
        # batch 1, no cache: the prompt's thoughts as naive_latent_forward fills them in, then a
        # full re-run per token (a generated <latent> is a plain token)
        ids = torch.tensor([p])
        _, embeds = naive_latent_forward(m, ids, torch.ones_like(ids), LAT)
        ref = []
        for _ in range(10):
            nxt = m.get_output_embeddings()(
                backbone(m)(inputs_embeds=embeds).last_hidden_state[0, -1]).argmax().item()
            ref.append(nxt)
            if nxt == EOS:
                break
            embeds = torch.cat([embeds, m.get_input_embeddings()(torch.tensor([[nxt]]))], 1)
        assert row[:len(ref)] == ref and n == len(ref)
        seen |= set(ref)
    assert len(seen) > 2                                                # not a vacuous comparison

def test_an_empty_step_is_one_newline_as_released():
    # a GSM8k-Aug line without an equation has steps [''] (the released conversion): the released
    # dataset.py encodes it as s + "\n", one line of the CoT text Q\n\n### A
    ex = {"question": "How many?", "steps": [""], "answer": "5,000"}
    tok = build_tokenizer("words", [ex])
    q, steps, answer = encode_example(tok, ex)
    assert steps == [tok.encode("\n")] and len(steps[0]) == 1
    released = ex["question"] + "\n" + "\n".join(ex["steps"]) + "\n### " + ex["answer"]
    assert q + steps[0] + answer[:-1] == tok.encode(released)

# ---- configuration checks (pure) and the script end to end

def test_bad_config_fails_with_clear_message():
    import coconut
    ok = {**{k: v for k, v in vars(coconut).items() if isinstance(v, (int, float, str, bool))},
          **dict(method="coconut", c_thought=1, epochs_per_stage=1, max_latent_stage=2,
                 uniform_prob=0.0, reset_optimizer="stage", batch_size=128, micro_batch_size=32,
                 precision="fp32", thoughts_sweep="0,2")}
    check_rules_of(coconut, ok, 2)                             # 128 = 32 x 2 accumulation x 2 ranks
    assert counts("0, 1,6") == [0, 1, 6]
    for bad, msg in [(dict(batch_size=100), "multiple of micro_batch_size"),
                     (dict(method="coconat"), "method='coconat': use one of 'coconut', 'cot'"),
                     (dict(c_thought=0), "c_thought"),
                     (dict(reset_optimizer="always"), "reset_optimizer"),
                     (dict(precision="fp16"), "precision='fp16'"),
                     (dict(thoughts_sweep="0,x"), "thoughts_sweep"),
                     (dict(thoughts_sweep="-1"), "thoughts_sweep"),
                     (dict(method="cot"), "thoughts_sweep needs thoughts")]:
        with pytest.raises(ValueError, match=msg):
            check_rules_of(coconut, {**ok, **bad}, 2)

TINY = COCONUT_TINY + ["--learning_rate=0.01"]

def run_script(args, out_dir):
    """coconut.py on TINY + args, in this process (tests/inprocess.py); the result reads as a
    finished subprocess's (returncode, stdout, stderr)."""
    return run_main("coconut.py", TINY + [f"--out_dir={out_dir}"] + args)

def step_losses(stdout):
    return [float(line.split("| loss ")[1].split()[0]) for line in stdout.splitlines()
            if line.startswith("step ")]

def weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]

# stages 0, 1, 2 (max_latent_stage=1, one epoch each): the last epoch is all-latent
TRAIN = ["--num_epochs=3", "--epochs_per_stage=1"]

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One process trained to the final stage: (out_dir, stdout)."""
    d = tmp_path_factory.mktemp("trained")
    r = run_script(TRAIN, d)
    assert r.returncode == 0, r.stderr[-2000:]
    return d, r.stdout

# (2 DDP ranks == 1 process, and FSDP: tests/test_coconut_script.py)

def test_precision_bf16_autocast_keeps_loss_fp32():
    # precision='bf16' is autocast (bf16 matmuls, fp32 weights); the loss is computed from fp32
    # log-probs
    m = tiny("gpt2")
    ids, mask, labels = ragged_batch()
    ref = Coconut(m, LAT)(ids, mask, labels)
    with autocast_ctx("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
        got = Coconut(m, LAT)(ids, mask, labels)
    assert got.dtype == torch.float32 and 0 < abs(got.item() - ref.item()) < 0.05
    assert all(p.dtype == torch.float32 for p in m.parameters())
    with autocast_ctx("cpu", "fp32"), autocast_ctx("cpu"):           # the old call: fp32 on the CPU
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32

def test_cot_checkpoint_gets_markers_added_and_initialised(tmp_path):
    # the GSM8k path: a CoT run (no markers in its vocabulary), then coconut from its best.pt;
    # lr=1e-30 (a learning rate must be > 0) moves no float32 weight, so the coconut run's ckpt.pt
    # shows the weights as set up: the new rows copies of '###', the rest unchanged
    cot = run_script(["--method=cot", "--num_epochs=1"], tmp_path / "cot")
    assert cot.returncode == 0, cot.stderr[-2000:]
    cot_ckpt = torch.load(tmp_path / "cot" / "best.pt", weights_only=True)
    assert cot_ckpt["markers"] is False
    r = run_script(["--init_from=" + str(tmp_path / "cot" / "best.pt"), "--marker_init=###",
                    "--num_epochs=1", "--start_stage=1", "--learning_rate=1e-30"],
                   tmp_path / "coco")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "markers: added" in r.stdout and "copies of '###'" in r.stdout
    old, new = cot_ckpt["model"], weights(tmp_path / "coco")
    key = "transformer.wte.weight"
    n_real = old[key].shape[0]
    for out in (cot.stdout, r.stdout):  # the task's words: the cot model has no marker rows
        assert f"examples, vocabulary {n_real}\n" in out
    assert new[key].shape[0] == n_real + 3 and torch.equal(new[key][:n_real], old[key])
    ids = [int(x) for x in r.stdout.split("markers: added, ids [")[1].split("]")[0].split(",")]
    assert sorted(ids) == list(range(n_real, n_real + 3))
    rows = new[key][ids]
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[1], rows[2])
    # a copy of a real token's row
    assert any(torch.equal(rows[0], old[key][i]) for i in range(n_real))
    assert torch.load(tmp_path / "coco" / "ckpt.pt", weights_only=True)["markers"] is True

def test_epoch_checkpoints_hold_each_epoch_and_start_another_run(tmp_path):
    # keep_epoch_checkpoints: epoch_N.pt = the weights after N epochs (log epoch N-1), weights
    # only; epoch_1.pt of a 2-epoch run is what a 1-epoch run ends with (the order is seeded by
    # (seed, epoch), no schedule), and it starts a coconut run as init_from
    cot = ["--method=cot", "--keep_epoch_checkpoints=True"]
    r = run_script(cot + ["--num_epochs=2"], tmp_path / "two")
    assert r.returncode == 0, r.stderr[-2000:]
    files = sorted(f for f in os.listdir(tmp_path / "two") if f.startswith("epoch_"))
    assert files == ["epoch_1.pt", "epoch_2.pt"]
    first = torch.load(tmp_path / "two" / "epoch_1.pt", weights_only=True)
    last = torch.load(tmp_path / "two" / "epoch_2.pt", weights_only=True)
    assert (first["epoch"], last["epoch"]) == (0, 1) and "optimizer" not in first
    assert first["script"] == "coconut" and first["markers"] is False
    assert all(torch.equal(v, weights(tmp_path / "two")[k]) for k, v in last["model"].items())
    one = run_script(["--method=cot", "--num_epochs=1"], tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    assert all(torch.equal(v, weights(tmp_path / "one")[k]) for k, v in first["model"].items())
    assert not any(torch.equal(v, last["model"][k]) for k, v in first["model"].items()
                   if k.endswith("wte.weight"))
    # the GSM8k path: coconut from a CoT epoch checkpoint (lr 1e-30: no float32 weight moves, so the
    # weights as loaded)
    r = run_script(["--init_from=" + str(tmp_path / "two" / "epoch_1.pt"), "--num_epochs=1",
                    "--start_stage=1", "--learning_rate=1e-30"], tmp_path / "coco")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "markers: added" in r.stdout
    key = "transformer.wte.weight"
    n_real = first["model"][key].shape[0]
    assert torch.equal(weights(tmp_path / "coco")[key][:n_real], first["model"][key])
    # no epoch files by default
    assert not [f for f in os.listdir(tmp_path / "one") if f.startswith("epoch_")]

def overlapping_json(tmp_path):
    """tmp_path/d_{split}.json (modsum examples) whose val split holds a training question."""
    import data
    splits = {s: data.load_task("modsum", s, n=16 if s == "train" else 4) for s in data.SPLITS}
    splits["val"][0] = splits["train"][3]
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        (tmp_path / f"d_{name}.json").write_text(json.dumps(splits[split]))
    return str(tmp_path / "d_{split}.json")

def test_split_overlap_refused_unless_allowed(tmp_path):
    data_args = ["--task=json", "--task_options={}", f"--data_path={overlapping_json(tmp_path)}"]
    r = run_script(data_args + ["--num_epochs=1"], tmp_path / "refused")
    assert r.returncode == 1 and "questions found in two splits (train/val 1)" in r.stderr
    assert "allow_split_overlap=True" in r.stderr and "\nstep " not in r.stdout
    r = run_script(data_args + ["--num_epochs=1", "--allow_split_overlap=True"], tmp_path / "ok")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning: questions found in two splits (train/val 1)" in r.stdout
    assert "test acc" in r.stdout

def test_thought_sweep_table_and_final_stage_row_equals_test_eval(trained, tmp_path):
    # a tiny model trained to the final stage (stages 0, 1, 2 with max_latent_stage=1), then one
    # evaluation run at 0..3 thoughts; the row for the final-stage count (1 x c_thought=1) is the
    # plain test evaluation
    out_dir, stdout = trained
    val_losses = [float(l.split("val loss ")[1].split()[0]) for l in stdout.splitlines()
                  if "val loss" in l]
    # printed every epoch, as released
    assert len(val_losses) == 3 and all(0 < v < 10 for v in val_losses)
    # batch_size is global: 8 = micro-batches of 4 x 2 accumulation steps on 1 process
    assert "global batch 8 = 4 per micro-step x 2 accumulation x 1 ranks" in stdout
    best = torch.load(out_dir / "best.pt", weights_only=True)
    assert best["stage"] == 2                                  # chosen among all-latent epochs only
    r = run_script(["--eval_only=True", f"--init_from={out_dir / 'best.pt'}",
                    "--thoughts_sweep=0,1,2,3", "--max_new_tokens=8"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(l for l in r.stdout.splitlines() if l.startswith("test acc"))
    acc, tokens = float(line.split()[2]), float(line.split("tokens generated ")[1].split()[0])
    table = [l for l in r.stdout.splitlines() if l.startswith("| ") and l[2].isdigit()]
    assert [int(l.split("|")[1]) for l in table] == [0, 1, 2, 3]
    with open(tmp_path / "thoughts_sweep.json") as f:
        rows = json.load(f)["rows"]
    assert [row["thoughts"] for row in rows] == [0, 1, 2, 3]
    assert rows[1]["accuracy"] == acc and round(rows[1]["tokens"], 1) == tokens
    # thoughts + at most max_new_tokens
    assert all(1 <= row["tokens"] - row["thoughts"] <= 8 for row in rows)

# ---- the presets reproduce the released runs (args/*.yaml of facebookresearch/coconut)

def resolve(*files):
    import coconut
    from configurator import configure
    return configure(dict(vars(coconut)), [os.path.join(ROOT, "config", f) for f in files],
                     verbose=False)

RELEASED = dict(c_thought=None, precision="fp32", learning_rate=1e-4, weight_decay=0.01,
                batch_size=128, uniform_prob=0.0, pad_latent_to_max=True)
PRESETS = [  # files, released values, thoughts (or pauses) at inference, markers copy '<<'
    (("coconut_prosqa.py",), dict(method="coconut", c_thought=1, epochs_per_stage=5,
                                  max_latent_stage=6, num_epochs=50, start_stage=0,
                                  reset_optimizer="epoch", max_new_tokens=128), 6, True),
    (("coconut_prontoqa.py",), dict(method="coconut", c_thought=1, epochs_per_stage=5,
                                    max_latent_stage=6, num_epochs=50, start_stage=0,
                                    reset_optimizer="epoch", max_new_tokens=128), 6, True),
    (("coconut_gsm8k_cot.py",), dict(method="cot", num_epochs=25, reset_optimizer="never",
                                     max_new_tokens=64, init_from="openai-community/gpt2",
                                     keep_epoch_checkpoints=True), 0, False),
    # the start: the CoT weights after 6 epochs (paper), which the CoT preset keeps
    (("coconut_gsm8k.py",), dict(method="coconut", c_thought=2, epochs_per_stage=3,
                                 max_latent_stage=3, start_stage=1, num_epochs=22,
                                 reset_optimizer="epoch", max_new_tokens=64,
                                 init_from="out/gsm8k_cot/epoch_6.pt"), 6, True),
    (("coconut_gsm8k_cot.py", "coconut_pause.py"),
     dict(method="pause", max_new_tokens=64), 6, True),
]

def preset_id(x):
    return "+".join(x) if isinstance(x, tuple) else None

@pytest.mark.parametrize("files,values,n_infer,copies", PRESETS, ids=preset_id)
def test_presets_resolve_to_released_values(files, values, n_infer, copies):
    cfg = resolve(*files)
    for key, want in {**RELEASED, **values}.items():
        if want is not None:
            assert cfg[key] == want, key
    lay = dict(method=cfg["method"], c_thought=cfg["c_thought"],
               max_latent_stage=cfg["max_latent_stage"], pad_latent_to_max=cfg["pad_latent_to_max"],
               special=(BOT, LAT, EOT))
    final = cfg["max_latent_stage"] + 1 if cfg["method"] == "coconut" else 0
    prompt = layout(Q, [[20]] * 9, [], final, Curriculum(**lay), inference=True)[0]
    assert prompt.count(LAT) == n_infer
    tok = build_tokenizer("words", [{"question": "a << b.", "steps": [], "answer": "c"}])
    if copies:                                                   # from GPT-2 (or a CoT model of it)
        assert marker_source(tok, cfg["marker_init"], "openai-community/gpt2") == tok.token_id("<<")
    if files == ("coconut_gsm8k.py",):  # released: resume=3, epochs 3..24 at stage epoch // 3
        assert ([stage_of(e, 1, 3, 3) for e in range(22)]
                == [min((e + 3) // 3, 4) for e in range(22)])

@pytest.mark.parametrize("preset", sorted(f for f in os.listdir(os.path.join(ROOT, "config"))
                                          if f.startswith("coconut_")
                                          and f != "coconut_prosqa_small.py"))   # CPU: below
def test_presets_parse_and_divide(preset):
    # every key exists with the right type, and the global batch divides on 1 and on 4 GPUs (the
    # released count); overlays (method files) sit on a task preset, so every file is read after
    # config/coconut_prosqa.py
    import coconut
    from configurator import configure
    files = [os.path.join(ROOT, "config", f) for f in ("coconut_prosqa.py", preset)]
    cfg = configure(dict(vars(coconut)), files, verbose=False)
    cfg["init_from"] = "scratch"                                       # (no CoT checkpoint here)
    check_rules_of(coconut, cfg, 1)                                    # 4 micro-steps on 1 GPU
    check_rules_of(coconut, cfg, 4)                                    # 1 on each of 4
    assert cfg["batch_size"] == 4 * cfg["micro_batch_size"]


def test_prosqa_small_preset_is_the_cpu_demo_on_prosqa_data():
    # one process, on its own (not over coconut_prosqa.py): the ProsQA-style CPU demo's settings,
    # and the kgraph default (python coconut.py) is what it replaces
    import coconut
    from configurator import configure
    assert (coconut.task, coconut.max_latent_stage, coconut.num_epochs) == ("kgraph", 1, 70)
    cfg = configure(dict(vars(coconut)), [os.path.join(ROOT, "config", "coconut_prosqa_small.py")],
                    verbose=False)
    check_rules_of(coconut, cfg, 1)
    want = dict(task="prosqa_small", c_thought=1, epochs_per_stage=3, max_latent_stage=3,
                num_epochs=15, batch_size=32, micro_batch_size=32, marker_init="auto",
                max_new_tokens=48, probe=2, method="coconut", init_from="scratch")
    assert {k: cfg[k] for k in want} == want
    assert eval(cfg["task_options"]) == dict(min_nodes=6, max_nodes=8, min_hops=2, max_hops=3)
