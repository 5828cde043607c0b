"""
Coconut: chain of continuous thought (Hao et al., "Training Large Language Models to Reason in a
Continuous Latent Space", arXiv 2412.06769), and its baselines, in one script.

A continuous thought is not a token: at a thought position t the input embedding is the model's own
last hidden state (after the final norm) at position t-1,

    e_t = h_{t-1}                                    (thought feedback: no sampling, no detach)
    L   = - sum_{t > <eot>} log p(x_t | x_<t, thoughts)     (loss only on what follows the thoughts)

so n thoughts take n+1 sequential forward passes; with a KV cache each position is still encoded
once. A staged curriculum trains it: stage 0 is plain chain of thought `Q\\n S1\\n ... ### A<eos>`;
at stage k the first k steps are replaced by k*c_thought thoughts between <bot> and <eot>; past
max_latent_stage every step is gone.

Launch (the defaults: a small generated ProsQA-style task, a tiny GPT-2 from scratch, minutes on a
CPU):
    python coconut.py                                        # CPU demo
    python coconut.py config/coconut_prosqa.py               # 1 GPU (batch 128 by accumulation)
    torchrun --standalone --nproc_per_node=8 coconut.py config/coconut_gsm8k.py \
        --micro_batch_size=16
    torchrun --standalone --nproc_per_node=8 coconut.py config/coconut_gsm8k.py --fsdp=True  # FSDP2
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 \
        --master_port=29500 coconut.py config/coconut_gsm8k.py --micro_batch_size=8
                                                             # and --node_rank=1 on the second node
Methods (--method=, or add an overlay such as config/coconut_pause.py after a task preset):
    coconut           thoughts fed back, curriculum
    pause_as_thought  same data, <latent> a learned token
    no_thoughts       curriculum deletes steps, nothing instead
    cot               Q S1..Sn A, stage 0 throughout
    no_cot            Q A
    pause             Q <latent>xN A, no curriculum
"w/o curriculum" is coconut at the final stage from the first epoch: --start_stage=99 (capped).
Accuracy against the number of inference thoughts (no retraining); bf16 autocast instead of fp32:
    python coconut.py config/coconut_prosqa.py --eval_only=True \
        --init_from=out/prosqa_coconut/best.pt --thoughts_sweep=0,1,2,3,4,5,6
    torchrun --standalone --nproc_per_node=4 coconut.py config/coconut_prosqa.py --precision=bf16
"""

import ast
import datetime
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn as nn
from torch.distributed import init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from configurator import UserError
from data import (load_task, build_tokenizer, check_split_overlap, question_text, step_text,
                  answer_text, COCONUT_MARKERS, COCONUT_SPECIAL_TOKENS, TASKS)
from evaluate import coconut_correct
from model import (load_model, backbone, lm_head, left_pad, position_ids_from_mask, token_logprobs,
                   decode, autocast_ctx, cache_kwargs, save_checkpoint, load_checkpoint,
                   prepare_out_dir, StopRequest, check_same_run, nonfinite_names, fsdp_wrap,
                   gathered, set_grad_sync, gather_full, full_state_dicts, load_full_state_dicts,
                   enable_activation_checkpointing, memory_plan, format_memory_plan,
                   check_memory_plan, device_memory_bytes, estimate_kv_cache_bytes,
                   estimate_activation_bytes, all_sum, ranks_identical, end_distributed, export_hf,
                   wandb_logger)

# -----------------------------------------------------------------------------
# configuration: the defaults are the CPU demo; config/coconut_*.py hold the paper's runs
# I/O
out_dir = "out/coconut"         # ckpt.pt (last, for resume), best.pt (best by val), hf/ (HF export)
overwrite = False               # a scratch run into an out_dir holding ckpt.pt/best.pt: True
                                # deletes them, else an error
ckpt_interval = 200             # also save ckpt.pt every this many optimizer steps (0: epoch ends)
init_from = "scratch"           # 'scratch' | 'resume' (out_dir/ckpt.pt) | path/to/ckpt.pt (e.g. a
                                # CoT run) | HF name or dir
eval_only = False               # evaluate init_from on the test split (and probe), then exit
wandb_log = False               # log to Weights & Biases (imported only when True)
wandb_project = "nanolatent"
wandb_run_name = "coconut"
# data
task = "prosqa_small"           # a data.load_task name: prosqa_small, prosqa, prontoqa, gsm8k_aug,
                                # json, ...
data_path = ""                  # local data file; '{split}' -> train/valid/test as in the released
                                # files (data/prosqa_{split}.json)
split_layout = ""               # one data file without {split}: 'tail:VAL,TEST' holds out its last
                                # rows (else refused)
n_train = 0                     # examples per split, 0 = the task's default size
n_val = 0
n_test = 0
# generator knobs (a dict literal; "{}" for files)
task_options = "{'min_nodes': 6, 'max_nodes': 8, 'min_hops': 2, 'max_hops': 3}"
tokenizer = ""                  # '' = the model's own (a word vocabulary for scratch, init_from's
                                # for an HF model, a checkpoint's own); 'words' = closed word
                                # vocabulary of the task; or an HF name/dir
# method
method = "coconut"              # coconut | cot | no_cot | no_thoughts | pause_as_thought | pause
c_thought = 1                   # thoughts per replaced step (paper: 2 GSM8k, 1 ProsQA/ProntoQA)
epochs_per_stage = 3            # curriculum: epochs per stage (paper: 3 GSM8k, 5 ProsQA/ProntoQA)
max_latent_stage = 3            # last stage with steps left; past it all steps are dropped
                                # (paper: 3 GSM8k, 6 ProsQA)
start_stage = 0                 # first stage: 1 when continuing from a CoT run; 99 (capped) = "w/o
                                # curriculum"
pad_latent_to_max = True        # True (released default): k*c thoughts at stage k whatever the
                                # step count; False: min(k, #steps)*c past the last stage and at
                                # inference (training stages k <= max_latent_stage keep k*c)
uniform_prob = 0.0              # chance that an example trains at a random stage in 0..#steps
                                # instead (released: 0)
n_thoughts_eval = -1            # thoughts at inference (and pause tokens); -1 = max_latent_stage *
                                # c_thought
thoughts_sweep = ""             # e.g. '0,1,2,3,4,5,6': test accuracy and tokens at each inference
                                # thought count, a table + out_dir/thoughts_sweep.json (the paper's
                                # accuracy-vs-thoughts analysis)
marker_init = "auto"            # the 3 new marker rows copy this one token's embedding (released:
                                # '<<'); 'auto' = '<<' (else '<') for pretrained weights, fresh rows
                                # for a model from scratch; '' = fresh N(0, 0.02) rows
# model (init_from='scratch')
arch = "gpt2"                   # gpt2 | llama
n_layer = 2
n_head = 4
n_embd = 128
block_size = 512                # maximum positions
dropout = 0.0
# optimization (paper: AdamW lr 1e-4, wd 0.01, global batch 128, fp32/bf16, no schedule or clipping)
num_epochs = 15                 # total epochs (paper: 25 GSM8k after the CoT run, 50 ProsQA)
batch_size = 32                 # GLOBAL batch in examples, all ranks and micro-steps (paper: 128)
micro_batch_size = 32           # examples per rank per forward; accumulation = batch / (micro x W)
learning_rate = 1e-3            # AdamW lr (paper: 1e-4 for pretrained GPT-2; a tiny model from
                                # scratch likes 1e-3)
weight_decay = 0.01
reset_optimizer = "stage"       # 'stage': new AdamW at each stage switch (paper text); 'epoch':
                                # every epoch (released coconut configs); 'never' (released GSM8k
                                # CoT)
precision = "fp32"              # 'fp32' (released) | 'bf16': bf16 autocast; weights, optimizer and
                                # log-probs stay fp32
fsdp = False                    # torchrun only: shard weights, gradients and AdamW state (FSDP2)
gradient_checkpointing = False  # recompute activations in the backward; not for method=coconut
                                # (its cached passes)
# evaluation
eval_batch_size = 64            # prompts per generate call, per rank
max_new_tokens = 48             # paper: 64 GSM8k, 128 others
probe = 2                       # top-k tokens of each thought, printed for this many test examples
                                # (0 = off)
probe_topk = 3
# system
device = "auto"                 # auto | cpu | cuda | cuda:1 ...
seed = 0
ddp_timeout = 1800              # seconds a collective (and init_process_group) waits for the others
METHODS = ("coconut", "cot", "no_cot", "no_thoughts", "pause_as_thought", "pause")
# the methods whose sequences hold the 3 new tokens, and those with a curriculum
MARKER_METHODS = ("coconut", "pause_as_thought", "pause")
CURRICULUM_METHODS = ("coconut", "no_thoughts", "pause_as_thought")
if __name__ == "__main__":
    from configurator import configure, exit_cleanly_on_user_error
    # a UserError (a wrong key, file, value) is one line `error: ...`, exit 1
    exit_cleanly_on_user_error()
    config = configure(globals(), sys.argv[1:])

# -----------------------------------------------------------------------------
# the curriculum: which tokens an example is at stage k, and what is learned

def stage_of(epoch, start_stage, epochs_per_stage, max_latent_stage):
    """The scheduled stage of an epoch; stages past max_latent_stage are all the same, so cap at
    max + 1."""
    return min(start_stage + epoch // epochs_per_stage, max_latent_stage + 1)

def flatten(pieces):
    """[[1, 2], [3]] -> [1, 2, 3]: the tokens of the steps, in one list."""
    return [t for piece in pieces for t in piece]

def layout(q, steps, answer, stage, *, method, c_thought, max_latent_stage, pad_latent_to_max,
           n_pause, special, n_thoughts=None, inference=False):
    """One example at curriculum `stage` as (prompt, target) token lists; the loss is on target
    only. q, answer: token ids (answer ends with eos); steps: list of token-id lists; special =
    (bot, latent, eot) ids. n_thoughts overrides the stage's thought count (inference with a chosen
    number of thoughts); inference=True builds the prompt as the released evaluation does (matters
    only for pad_latent_to_max=False)."""
    bot, latent, eot = special
    # the methods without a curriculum: the stage plays no part
    if method == "cot":                                                # Q S1 .. Sn ### A
        return q, flatten(steps) + answer
    if method == "no_cot":
        return q, answer
    if method == "pause":                                              # Q + N pause tokens + A
        if n_thoughts is None:
            n_thoughts = n_pause
        return q + [latent] * n_thoughts, answer
    # stage k drops the first k steps; past the last stage, all of them
    kept = steps[stage:] if stage <= max_latent_stage else []
    if method == "no_thoughts":                                        # "w/o thought"
        return q, flatten(kept) + answer
    # coconut and pause_as_thought: c_thought thoughts per dropped step, up to the last stage
    k = min(stage, max_latent_stage)
    # pad_latent_to_max=False, as released: a training stage k <= max_latent_stage still gives k*c
    # thoughts to an example with fewer than k steps; only past the last stage and at inference is
    # k capped by the step count
    if not pad_latent_to_max and (inference or stage > max_latent_stage):
        k = min(k, len(steps))
    n = k * c_thought if n_thoughts is None else n_thoughts
    return q + [bot] + [latent] * n + [eot], flatten(kept) + answer

def thoughts_at_stage(stage, lay):
    """The thoughts (or pauses) at `stage` of an example with more steps than any stage replaces:
    what the schedule and the step log report. lay: layout()'s keyword arguments."""
    many_steps = [[0]] * 99
    prompt, _ = layout([], many_steps, [], stage, **lay)
    latent = lay["special"][1]
    return prompt.count(latent)

def marker_ids(tok):
    """Add the three markers to the tokenizer (in data.py's vocabulary order); returns their ids by
    role, (<bot>, <latent>, <eot>): the order layout() takes."""
    tok.add_special_tokens(COCONUT_SPECIAL_TOKENS)
    return tuple(tok.token_id(COCONUT_MARKERS[role]) for role in ("bot", "latent", "eot"))

def markers_present(tok, ckpt):
    """Do the weights to load already have marker rows? A checkpoint of this script says so (older
    ones always had them); a save_pretrained export of this script (init_from=out/.../hf) has them
    when its tokenizer does."""
    if ckpt is not None:
        return ckpt.get("markers", True)
    vocab = tok.hf.get_vocab()
    return all(t in vocab for t in COCONUT_SPECIAL_TOKENS)

def marker_source(tok, marker_init, base):
    """The id of the token whose embedding the new markers copy, or None for fresh random rows.
    'auto': '<<' as released (one token in GPT-2's vocabulary), else '<', for pretrained weights;
    None for a model from scratch, whose rows are all random anyway. Fails, naming the key, unless
    the text is one token."""
    if marker_init == "auto":
        if base == "scratch":
            return None
        texts = ["<<", "<"]
    elif marker_init:
        texts = [marker_init]
    else:
        texts = []
    for text in texts:
        try:
            ids = tok.encode(text)
        except ValueError:  # the word vocabulary refuses words it does not have
            ids = []
        if len(ids) == 1:
            return ids[0]
    if texts:
        tried = " / ".join(map(repr, texts))
        raise UserError(f"marker_init={marker_init!r}: {tried} is not exactly one token in this "
                        f"vocabulary; set --marker_init to a text that is one token, or '' for "
                        f"fresh rows")
    return None

def init_markers(model, n_vocab, special, source_id):
    """Give the markers embedding rows: grow the matrices to n_vocab rows if needed (a checkpoint
    without markers), then copy the source token's row into each marker row, as released. A fresh
    row in a pretrained tied head would get a logit near 0, far above real tokens' (strongly
    negative) logits: training would start by predicting markers. GPT-2 ties head and input
    embedding, so one write sets both; an untied head gets its own source row."""
    if model.get_input_embeddings().weight.shape[0] < n_vocab:
        model.resize_token_embeddings(n_vocab, mean_resizing=False)
    if source_id is None:
        return
    inp, out = model.get_input_embeddings().weight, lm_head(model).weight
    matrices = [inp] if out is inp else [inp, out]
    with torch.no_grad():
        for w in matrices:
            w[list(special)] = w[source_id].clone()

def encode_example(tok, ex):
    """(question, steps, answer + eos) token lists. The question is encoded as the tokenizer encodes
    a text on its own (add_special_tokens=True), as released: GPT-2 and the word vocabulary add no
    BOS, Llama adds one."""
    q = tok.encode(question_text(ex), add_special_tokens=True)
    steps = [tok.encode(step_text(st)) for st in ex["steps"]]
    return q, steps, tok.encode(answer_text(ex)) + [tok.eos_id]

def collate(rows, anchors, pad_id, c0=None, width=None):
    """rows: list of (prompt, target); anchors: where each row's first thought goes (len(prompt) if
    none). Left-pad so every anchor sits in the same column c0: thought j of every row is then
    column c0+j, and one tensor op per pass feeds the whole batch. Right-pad the rest. c0, width: at
    least this anchor column and this many columns (FSDP: every rank's batch laid out alike).
    Returns input_ids, attention_mask, labels (B, T)."""
    c0 = max(max(anchors), c0 or 0)
    left = [c0 - a for a in anchors]
    T = max(max(l + len(p) + len(t) for l, (p, t) in zip(left, rows)), width or 0)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    # -100: no loss (question, markers, thoughts, pad)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (l, (p, t)) in enumerate(zip(left, rows)):
        end = l + len(p) + len(t)
        input_ids[i, l:end] = torch.tensor(p + t)
        labels[i, l + len(p):end] = torch.tensor(t, dtype=torch.long)
        mask[i, l:end] = 1
    return input_ids, mask, labels

def anchor(prompt, latent_id):
    """The column of the first thought (or the end of a prompt without one)."""
    return prompt.index(latent_id) if latent_id in prompt else len(prompt)

# -----------------------------------------------------------------------------
# the latent forward, e_t = h_{t-1}: first the idea (a full re-run per thought), then the same with
# a KV cache (one pass over the prefix, one cached pass per thought column, one over the rest)

def naive_latent_forward(model, input_ids, attention_mask, latent_id):
    """Continuous thoughts the plain way, e_t = h_{t-1}: for each thought column, left to right,
    re-run the model over everything before it and feed its last hidden state in as the column's
    input embedding; then one pass over the whole sequence. n thoughts cost n+1 passes over ever
    longer prefixes. latent_forward computes the same with each position encoded once (a test holds
    them equal: tests/test_coconut.py::test_cached_forward_equals_naive_rerun; bench.py times both).
    Returns (last hidden states (B, T, C), the input embeddings with the thoughts filled in)."""
    embeds = model.get_input_embeddings()(input_ids)                   # (B, T, C)
    pos = position_ids_from_mask(attention_mask)
    thought_cols = (input_ids == latent_id).any(0).nonzero().flatten().tolist()
    for c in thought_cols:
        # h_{c-1}: the last hidden state of the prefix, the thoughts before column c included
        prefix = backbone(model)(inputs_embeds=embeds[:, :c], attention_mask=attention_mask[:, :c],
                                 position_ids=pos[:, :c])
        h = prefix.last_hidden_state[:, -1]                            # (B, C)
        # e_c = h_{c-1} in the rows with a thought in column c; the other rows keep their token
        is_thought = (input_ids[:, c] == latent_id)[:, None]
        fed = torch.where(is_thought, h, embeds[:, c])
        embeds = torch.cat([embeds[:, :c], fed[:, None], embeds[:, c + 1:]], dim=1)
    out = backbone(model)(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=pos)
    return out.last_hidden_state, embeds

def latent_forward(model, input_ids, attention_mask, latent_id, cols=None):
    """naive_latent_forward with each position encoded once (e_t = h_{t-1}; a test holds the two
    equal): the columns that hold a thought in any row split the sequence into passes, and a
    DynamicCache keeps every earlier position's keys and values. Gradients flow through every
    thought and the cached keys/values. latent_id=None: one plain pass. cols: the columns to split
    at, a superset of the thought columns (FSDP: the same passes on every rank; a split at a token
    column changes nothing, the cache carries it). Returns (last hidden states (B, T, C), cache)."""
    embeds = model.get_input_embeddings()(input_ids)                   # (B, T, C)
    # left padding: each row's positions start at its first real token
    pos = position_ids_from_mask(attention_mask)
    if latent_id is None:
        is_latent = torch.zeros_like(input_ids, dtype=torch.bool)
    else:
        is_latent = input_ids == latent_id
    if cols is None:
        # the thought columns (one device sync per forward)
        cols = is_latent.any(0).nonzero().flatten().tolist()
    # the passes: [0, c0) [c0, c0+1) ... [c_last+1, T), each thought column on its own
    T = input_ids.shape[1]
    bounds = sorted({0, T} | set(cols) | {c + 1 for c in cols})
    cache, hs = DynamicCache(config=model.config), []
    for s, e in zip(bounds[:-1], bounds[1:]):
        x = embeds[:, s:e]                                             # (B, e-s, C)
        if s in cols:
            # a thought column: rows with <latent> here take h_{s-1}, the others keep their token
            h = hs[-1][:, -1:].to(x.dtype)
            x = torch.where(is_latent[:, s:e, None], h, x)
        # the cache holds positions [0, s); the mask covers everything up to e
        out = backbone(model)(inputs_embeds=x, attention_mask=attention_mask[:, :e],
                              position_ids=pos[:, s:e], use_cache=True,
                              **cache_kwargs(backbone(model), cache))
        hs.append(out.last_hidden_state)                               # after the final norm
    return torch.cat(hs, dim=1), cache

class Coconut(nn.Module):
    """The model plus thought feedback, in one forward so that DDP sees one forward per backward.
    latent_id=None (every method but coconut, pause_as_thought included) makes it a plain LM."""
    def __init__(self, model, latent_id):
        super().__init__()
        self.model, self.latent_id = model, latent_id

    def forward(self, input_ids, attention_mask, labels, cols=None):
        hidden, _ = latent_forward(self.model, input_ids, attention_mask, self.latent_id, cols)
        # h_t predicts x_{t+1}; the LM head runs only where there is a label
        targets, mask = labels[:, 1:], labels[:, 1:] != -100
        logp = token_logprobs(self.model, hidden[:, :-1], targets.clamp(min=0), mask)
        # the mean next-token cross-entropy
        return -logp.sum() / mask.sum().clamp(min=1)

# -----------------------------------------------------------------------------
# inference: latent prefix with the cache, then KV-cached greedy decoding; the thought probe

@torch.no_grad()
def generate_answers(model, prompts, latent_id, eos_id, pad_id, max_new_tokens, device):
    """Greedy continuations (B, T_new) of a list of prompts ending in their thoughts (same count in
    every row, so plain left padding aligns them) and each row's number of generated tokens up to
    and including eos."""
    input_ids, mask = left_pad(prompts, pad_id, device)
    hidden, cache = latent_forward(model, input_ids, mask, latent_id)
    last_logits = lm_head(model)(hidden[:, -1]).float()                # (B, V)
    tokens, stopped = decode(model, last_logits, cache, mask, max_new_tokens,
                             stop_sequences=[[eos_id]], pad_id=pad_id)
    # a row that stopped counts up to its first eos; the others, every token
    first_eos = (tokens == eos_id).float().argmax(1) + 1
    every_token = torch.full_like(first_eos, tokens.shape[1])
    return tokens, torch.where(stopped, first_eos, every_token)

@torch.no_grad()
def probe_thoughts(model, prompt, latent_id, k, device):
    """The paper's analysis: each continuous thought read through the LM head. Returns (n, k) probs
    and token ids of the top-k tokens of every thought vector fed back (the hidden state just before
    each <latent>)."""
    input_ids = torch.tensor([prompt], device=device)
    hidden, _ = latent_forward(model, input_ids, torch.ones_like(input_ids), latent_id)
    cols = [i - 1 for i, t in enumerate(prompt) if t == latent_id]
    return lm_head(model)(hidden[0, cols]).float().softmax(-1).topk(k)

def probe_lines(tok, probs, ids):
    """probe_thoughts' answer, one log line per thought: its top-k tokens and probabilities."""
    lines = []
    for j, (top_p, top_ids) in enumerate(zip(probs.tolist(), ids.tolist())):
        words = [f"{tok.decode([i], skip_special_tokens=False)!r} {q:.2f}"
                 for i, q in zip(top_ids, top_p)]
        lines.append(f"    thought {j + 1}: " + "  ".join(words))
    return lines

def eval_prompts(rows, stage, lay, n_thoughts=None):
    """The prompts (question + markers + thoughts, as the released evaluation lays them out) of
    encoded examples at `stage`; n_thoughts overrides the stage's thought count."""
    return [layout(q, steps, [], stage, **lay, n_thoughts=n_thoughts, inference=True)[0]
            for q, steps, _ in rows]

def evaluate_rank(model, prompts, answers, tok, latent_id, batch_size, max_new_tokens, device):
    """Greedy accuracy on this rank's share of the prompts: (n_correct, n_tokens incl. thoughts,
    texts)."""
    n_correct, n_tokens, texts = 0, 0, []
    for i in range(0, len(prompts), batch_size):
        batch, golds = prompts[i:i + batch_size], answers[i:i + batch_size]
        tokens, n_gen = generate_answers(model, batch, latent_id, tok.eos_id, tok.pad_id,
                                         max_new_tokens, device)
        for row, n, prompt, gold in zip(tokens.tolist(), n_gen.tolist(), batch, golds):
            texts.append(tok.decode(row[:n]))
            n_correct += coconut_correct(texts[-1], gold)              # exact match after last '#'
            # the paper's "# tokens" counts the thoughts too
            n_tokens += n + prompt.count(latent_id)
    return n_correct, n_tokens, texts

def greedy_accuracy(model, wrapper, prompts, golds, n_total, tok, feedback_id, batch_size,
                    max_new_tokens, ctx, device):
    """(accuracy, mean tokens generated with thoughts, this rank's texts) over all ranks: each rank
    brings its own prompts (examples r, r+W, ...: each counted exactly once, no sampler padding),
    and the counts are summed over the ranks. n_total: the examples of all ranks."""
    model.eval()
    # FSDP: the weights are gathered once for the whole call, so ranks may run different counts
    with ctx, gathered(wrapper):
        n_correct, n_tokens, texts = evaluate_rank(model, prompts, golds, tok, feedback_id,
                                                   batch_size, max_new_tokens, device)
    model.train()
    sums = all_sum(torch.tensor([n_correct, n_tokens], dtype=torch.float64), device)
    return sums[0].item() / n_total, sums[1].item() / n_total, texts

@torch.no_grad()
def validation_loss(wrapper, coconut_model, rows, stage, lay, latent_id, pad_id, batch_size, ctx,
                    device):
    """Mean next-token loss per labelled token at the epoch's training layout (the released code
    prints it each epoch): each rank brings its own rows, the sums are added over the ranks."""
    total, count = 0.0, 0
    coconut_model.model.eval()
    with gathered(wrapper):
        for i in range(0, len(rows), batch_size):
            batch = [layout(*ex, stage, **lay) for ex in rows[i:i + batch_size]]
            anchors = [anchor(p, latent_id) for p, _ in batch]
            ids, mask, labels = (t.to(device) for t in collate(batch, anchors, pad_id))
            n = (labels[:, 1:] != -100).sum().item()
            with ctx:
                # the loss is the mean over this batch's n labelled tokens
                total += coconut_model(ids, mask, labels).item() * n
            count += n
    coconut_model.model.train()
    sums = all_sum(torch.tensor([total, count], dtype=torch.float64), device)
    return sums[0].item() / max(sums[1].item(), 1)

# -----------------------------------------------------------------------------
# checks: every wrong key, value or file fails before any work, with the numbers to change

def check_config(cfg, world_size):
    """Fail before any work, with the numbers to change: every key that has a wrong value or kind,
    one at a time. Returns the gradient accumulation steps."""
    def need(ok, message):
        if not ok:
            raise UserError(message)
    # the task first: its options are its own
    need(cfg["task"] in TASKS, f"task={cfg['task']!r} is unknown; known: {', '.join(TASKS)}")
    try:
        opts = ast.literal_eval(cfg["task_options"])
    except (ValueError, SyntaxError):
        opts = None
    need(isinstance(opts, dict), f"task_options={cfg['task_options']!r} must be a dict literal, "
                                 f"e.g. \"{{'min_hops': 2}}\" or \"{{}}\"")
    need(cfg["method"] in METHODS,
         f"method={cfg['method']!r} is unknown; use one of {', '.join(METHODS)}")
    choices_of = {"reset_optimizer": ("stage", "epoch", "never"), "precision": ("fp32", "bf16"),
                  "arch": ("gpt2", "llama")}
    for key, choices in choices_of.items():
        need(cfg[key] in choices, f"{key}={cfg[key]!r}: use one of {', '.join(map(repr, choices))}")
    dev = cfg["device"]
    need(dev in ("auto", "cpu") or dev.split(":")[0] == "cuda",
         f"device={dev!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    # sizes, counts and intervals: positive, or the documented 0 / -1
    positive = ["c_thought", "epochs_per_stage", "batch_size", "micro_batch_size",
                "eval_batch_size", "max_new_tokens", "probe_topk", "n_layer", "n_head", "n_embd",
                "block_size", "ddp_timeout"]
    if not cfg["eval_only"]:
        positive.append("num_epochs")
    for key in positive:
        hint = ""
        if key == "num_epochs":
            hint = " (eval_only=True evaluates without training)"
        need(cfg[key] > 0, f"{key}={cfg[key]} must be > 0{hint}")
    for key in ("n_train", "n_val", "n_test", "max_latent_stage", "start_stage", "probe",
                "ckpt_interval", "learning_rate", "weight_decay"):
        need(cfg[key] >= 0, f"{key}={cfg[key]} must be >= 0")
    need(cfg["n_thoughts_eval"] >= -1, f"n_thoughts_eval={cfg['n_thoughts_eval']} must be >= 0, "
                                       f"or -1 (= max_latent_stage * c_thought)")
    need(0 <= cfg["uniform_prob"] <= 1, f"uniform_prob={cfg['uniform_prob']} must be in [0, 1]")
    need(0 <= cfg["dropout"] < 1, f"dropout={cfg['dropout']} must be in [0, 1)")
    need(cfg["n_embd"] % cfg["n_head"] == 0,
         f"n_embd={cfg['n_embd']} must be a multiple of n_head={cfg['n_head']}")
    if cfg["eval_only"]:
        need(cfg["init_from"] != "scratch",
             "eval_only=True with init_from='scratch' would score an untrained model: give "
             "--init_from=resume, a .pt checkpoint or a trained model")
    if cfg["thoughts_sweep"]:
        parse_counts(cfg["thoughts_sweep"])
        need(cfg["method"] in MARKER_METHODS,
             f"thoughts_sweep needs thoughts or pauses; method={cfg['method']!r} has none (use one "
             f"of {', '.join(MARKER_METHODS)})")
    # activation checkpointing drops the KV cache inside a checkpointed layer: the thought passes
    # would stop seeing the earlier positions (model.enable_activation_checkpointing; README
    # "Beyond one GPU's memory")
    need(not (cfg["gradient_checkpointing"] and cfg["method"] == "coconut"),
         "gradient_checkpointing=True does not work with method=coconut: its thought passes carry "
         "a KV cache with gradients, which checkpointed layers drop; use --fsdp=True or a smaller "
         "micro_batch_size instead")
    per_step = cfg["micro_batch_size"] * world_size
    need(cfg["batch_size"] % per_step == 0,
         f"batch_size={cfg['batch_size']} (global) must be a multiple of micro_batch_size="
         f"{cfg['micro_batch_size']} x {world_size} ranks = {per_step}: change batch_size, "
         f"micro_batch_size or the number of processes")
    return cfg["batch_size"] // per_step                               # gradient accumulation steps

def parse_counts(text):
    """'0,1,2' -> [0, 1, 2] (thought counts for the sweep)."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = [-1]
    if not counts or min(counts) < 0:
        raise UserError(f"thoughts_sweep={text!r}: give thought counts >= 0 separated by commas, "
                        f"e.g. 0,1,2,3")
    return counts

def check_init_from(init_from):
    """A .pt to start from must exist; any other file is not something to load."""
    if init_from.endswith(".pt") and not os.path.isfile(init_from):
        raise UserError(f"init_from={init_from!r}: no such checkpoint file")
    named = init_from in ("scratch", "resume")
    if not init_from.endswith(".pt") and not named and os.path.isfile(init_from):
        raise UserError(f"init_from={init_from!r} is a file but not a .pt checkpoint: give a .pt "
                        f"file of coconut.py, a save_pretrained directory or a hub name")

# what a resumed run must share with its checkpoint (num_epochs, out_dir, eval settings may change)
RESUME_KEYS = ("arch", "n_layer", "n_head", "n_embd", "block_size", "dropout", "task",
               "task_options", "data_path", "split_layout", "n_train", "tokenizer", "seed",
               "method", "c_thought", "epochs_per_stage", "max_latent_stage", "start_stage",
               "pad_latent_to_max", "uniform_prob", "batch_size")

def check_checkpoint_kind(ckpt, path):
    """A checkpoint of latro.py (or of anything else) is not a Coconut checkpoint: refused by
    name."""
    if ckpt.get("script", "coconut") != "coconut" or "method" not in ckpt.get("config", {}):
        maker = ckpt.get("script", "another script")
        raise UserError(f"{path} is not a coconut.py checkpoint (made by {maker}): give a "
                        f"checkpoint of coconut.py, or an HF model name or directory")

def resolve_tokenizer(name, base, ckpt=None):
    """The tokenizer follows the model unless set: '' -> a checkpoint's own, else the word
    vocabulary for a model from scratch, else the HF model's own (init_from, a hub name or a local
    directory: offline works)."""
    if name:
        return name
    if ckpt is not None:
        saved = ckpt.get("tokenizer") or ckpt.get("config", {}).get("tokenizer")
        if saved:
            return saved
    return "words" if base == "scratch" else base

def longest_training_row(rows, stages, uniform_prob, lay):
    """(length, index, stage) of the longest training sequence (prompt + target) at every stage a
    row can be drawn at: the scheduled `stages`, and with uniform_prob > 0 any of 0..#steps of that
    row too. (0, None, None) when nothing trains (eval_only)."""
    best = (0, None, None)
    for i, ex in enumerate(rows):
        drawn = set(stages)
        if uniform_prob > 0 and stages:
            drawn |= set(range(len(ex[1]) + 1))
        for st in drawn:
            prompt, target = layout(*ex, st, **lay)
            if len(prompt) + len(target) > best[0]:
                best = (len(prompt) + len(target), i, st)
    return best

def max_positions(hf_config):
    """The positions a model can take (GPT-2: n_positions; Llama and most others:
    max_position_embeddings)."""
    n = getattr(hf_config, "n_positions", None)
    return n or getattr(hf_config, "max_position_embeddings", None)

# -----------------------------------------------------------------------------
# the training loop's decisions, as small functions the loop calls and the tests import

def draw_stages(rng, stage, uniform_prob, n_steps_list):
    """Each training example's stage this epoch: the scheduled `stage`, or with probability
    uniform_prob a random stage in 0..#steps of that example (released: uniform_prob=0). One
    rng.random() per example, then a randint for the drawn ones, in order: the same draws on every
    rank and on resume."""
    return [stage if rng.random() >= uniform_prob else rng.randint(0, n) for n in n_steps_list]

def epoch_order(seed, epoch, stage, uniform_prob, n_steps_list):
    """(stages, permutation) of an epoch, seeded by (seed, epoch) only: every rank and every resume
    draws the same, so a run resumed mid-epoch continues with the same batches."""
    rng = random.Random(seed + epoch)
    stages = draw_stages(rng, stage, uniform_prob, n_steps_list)
    return stages, rng.sample(range(len(n_steps_list)), len(n_steps_list))

def rank_block(batch, rank, micro, grad_accum, micro_batch_size):
    """This rank's examples at this micro-step: the global batch is cut into world x grad_accum
    blocks, rank r takes blocks r*grad_accum .. (r+1)*grad_accum-1, so 2 ranks x 1 micro-step == 1
    process x 2 micro-steps."""
    at = (rank * grad_accum + micro) * micro_batch_size
    return batch[at:at + micro_batch_size]

def resets_optimizer(epoch, stage_at_epoch, mode):
    """Does epoch `epoch` start with a new AdamW? stage_at_epoch: the stage of each epoch (a list,
    or a function of the epoch). 'epoch': every epoch but the first; 'stage': when the stage
    changes; 'never'."""
    if epoch == 0 or mode == "never":
        return False
    if mode == "epoch":
        return True
    at = stage_at_epoch if callable(stage_at_epoch) else stage_at_epoch.__getitem__
    return at(epoch) != at(epoch - 1)

def step_seed(seed, iter_num, rank):
    """The torch seed of optimizer step iter_num on a rank (dropout): reseeding each step makes a
    resume at any step exact without saving every rank's RNG state."""
    return (seed * 1_000_003 + iter_num) * 1009 + rank

def aligned_columns(rows, anchors, feedback_id, device):
    """FSDP: every pass all-gathers each layer, so every rank must run the same passes even when its
    rows hold fewer thoughts. The max over the ranks (a collective) of the anchor column, the length
    after it and the thought count: every rank then lays its micro-batch out alike and splits at the
    same columns. Returns (c0, width, cols) for collate() and the forward."""
    n = 0
    if feedback_id is not None:
        n = max(p.count(feedback_id) for p, _ in rows)
    after = max(len(p) + len(t) - a for (p, t), a in zip(rows, anchors))
    t = torch.tensor([max(anchors), after, n], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    c0, after, n = t.tolist()
    return c0, c0 + after, list(range(c0, c0 + n))

def grad_norm(model):
    """The global gradient norm (after the sync: the same on every rank; gathered under FSDP)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)

# -----------------------------------------------------------------------------
# logging and checkpoints

def log(*args):
    """print on rank 0 only (torchrun gives every process its RANK; a plain run is rank 0)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args)

def write_checkpoint(path, obj, model_sd, iter_num, master):
    """obj plus the weights, written from rank 0, never with non-finite weights: every rank checks
    the same (gathered) values, so every rank stops together and the last good file stays."""
    bad = nonfinite_names(model_sd.items())
    if bad:
        raise UserError(f"non-finite weights ({', '.join(bad[:3])}) after step {iter_num}: "
                        f"{os.path.basename(path)} not written, the last one kept; lower "
                        f"--learning_rate")
    if master:
        save_checkpoint(path, {**obj, "model": model_sd})

def save_resume_point(path, model, optimizer, master, run_info, *, epoch, step_in_epoch, stage,
                      iter_num, best_val_acc):
    """ckpt.pt: where to continue (the epoch, the steps done in it) and everything to continue
    exactly: weights and AdamW state (gathered whole under FSDP: every rank calls it)."""
    model_sd, optim_sd = full_state_dicts(model, optimizer)
    where = {"epoch": epoch, "step_in_epoch": step_in_epoch, "stage": stage, "iter_num": iter_num,
             "best_val_acc": best_val_acc}
    write_checkpoint(path, {"optimizer": optim_sd, **run_info, **where}, model_sd, iter_num, master)

# -----------------------------------------------------------------------------
if __name__ == "__main__":
    # ---- DDP set-up (torchrun sets RANK) and every check that needs no data
    ddp = int(os.environ.get("RANK", -1)) != -1
    ddp_rank = int(os.environ.get("RANK", 0))
    ddp_local_rank = int(os.environ.get("LOCAL_RANK", 0))
    ddp_world_size = int(os.environ.get("WORLD_SIZE", 1))
    master_process = ddp_rank == 0                                     # logs and writes checkpoints
    # a wrong key, value or file fails here, before any work
    grad_accum = check_config(config, ddp_world_size)
    check_init_from(init_from)
    if fsdp and not ddp:
        raise UserError("fsdp=True shards over the processes of a torchrun launch: start with "
                        "torchrun --nproc_per_node=N coconut.py ..., or drop --fsdp=True")
    resume = init_from == "resume"
    # rank 0 creates, write-probes and locks out_dir: no silent overwrite
    if master_process and not eval_only:
        out_lock = prepare_out_dir(out_dir, resume=resume, overwrite=overwrite)
    elif os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir {out_dir!r} is a file, not a directory: choose another --out_dir")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if ddp:
        # NCCL on CUDA, gloo on the CPU
        backend = "nccl" if device.startswith("cuda") else "gloo"
        init_process_group(backend=backend, timeout=datetime.timedelta(seconds=ddp_timeout))
        if device.startswith("cuda"):
            device = f"cuda:{ddp_local_rank}"
            torch.cuda.set_device(device)
    sharding = " (fsdp)" if fsdp else ""
    log(f"global batch {batch_size} = {micro_batch_size} per micro-step x {grad_accum} "
        f"accumulation x {ddp_world_size} ranks{sharding}")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    ctx = autocast_ctx(device_type, precision)                         # fp32 as released, or bf16

    # ---- data: examples -> token pieces (question, steps, answer + eos), identical on every rank.
    # load_task fills '{split}' (valid or val) and refuses one file for all splits unless
    # split_layout cuts it
    splits = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        splits[split] = load_task(task, split, path=data_path, n=n, seed=seed,
                                  split_layout=split_layout, **ast.literal_eval(task_options))
    check_split_overlap(splits)                                        # no question in two splits
    # the last partial batch is dropped
    steps_per_epoch = len(splits["train"]) // batch_size
    if steps_per_epoch == 0 and not eval_only:
        raise UserError(f"{len(splits['train'])} training examples < batch_size={batch_size}: "
                        f"lower batch_size or give more data (n_train)")

    # ---- the checkpoint to start from: of this script, and (resume) of this very run
    ckpt_path = os.path.join(out_dir, "ckpt.pt") if resume else init_from
    ckpt = None
    if resume or init_from.endswith(".pt"):
        try:
            ckpt = load_checkpoint(ckpt_path)
        except (FileNotFoundError, RuntimeError) as e:
            raise UserError(str(e)) from None
        check_checkpoint_kind(ckpt, ckpt_path)
        # a resumed run takes the checkpoint's values: a different one is refused, never ignored
        if resume:
            check_same_run(ckpt["config"], config, RESUME_KEYS)
    base = ckpt["base"] if ckpt else init_from                         # 'scratch' or an HF model
    # the model's config.json: found (local or hub) before anything else is read
    if base != "scratch":
        try:
            base_cfg = AutoConfig.from_pretrained(base)
        except OSError as e:  # no such directory, and not on the hub (or offline, not cached)
            first_line = str(e).splitlines()[0]
            raise UserError(f"init_from={base!r}: no model there ({first_line}); give a "
                            f"save_pretrained directory, a hub name, 'scratch' or a .pt "
                            f"checkpoint") from None
    tok_name = resolve_tokenizer(tokenizer, base, ckpt)                # the model's own unless set
    tok = build_tokenizer(tok_name, [ex for exs in splits.values() for ex in exs])
    encoded = {s: [encode_example(tok, ex) for ex in exs] for s, exs in splits.items()}
    whose = "" if tokenizer else " (the model's own)"
    log(f"tokenizer: {tok_name}{whose}")
    sizes = ", ".join(f"{s} {len(e)}" for s, e in splits.items())
    log(f"{task}: {sizes} examples, vocabulary {len(tok)}")

    # ---- the markers: only for the methods that use them, as released. A checkpoint of this script
    # brings its own (resume) or has none (the GSM8k CoT stage): then they are added and set now
    had_markers = markers_present(tok, ckpt)                           # trained rows are kept
    new_markers = method in MARKER_METHODS and not had_markers
    source_id = None
    if new_markers:
        source_id = marker_source(tok, marker_init, base)              # fails here, before any work
    n_real = len(tok)                                                  # the vocabulary, no markers
    special = (None, None, None)                                       # <bot>, <latent>, <eot> ids
    if method in MARKER_METHODS or had_markers:
        special = marker_ids(tok)
    latent_id = special[1]
    # pause_as_thought: <latent> stays a learned token; only coconut feeds hidden states back
    feedback_id = latent_id if method == "coconut" else None

    # ---- the curriculum: the stage of every epoch, and of the epoch a last checkpoint resumes at
    curriculum = method in CURRICULUM_METHODS
    final_stage = max_latent_stage + 1 if curriculum else 0
    stage_at = [0] * (num_epochs + 1)
    if curriculum:
        stage_at = [stage_of(ep, start_stage, epochs_per_stage, max_latent_stage)
                    for ep in range(num_epochs + 1)]
    scheduled = set(stage_at[:num_epochs])
    lay = dict(method=method, c_thought=c_thought, max_latent_stage=max_latent_stage,
               special=special, pad_latent_to_max=pad_latent_to_max,
               n_pause=max_latent_stage * c_thought)
    for st in sorted(scheduled):
        eps = [ep for ep in range(num_epochs) if stage_at[ep] == st]
        replaced = "all" if st > max_latent_stage else st
        if not curriculum:
            replaced = "no"
        log(f"schedule: epochs {eps[0]}-{eps[-1]} {method} stage {st}: "
            f"{thoughts_at_stage(st, lay)} thoughts/pauses, {replaced} steps replaced")
    if final_stage not in scheduled and not eval_only:
        log(f"note: no epoch reaches the final stage {final_stage}, so no best.pt: the last "
            f"weights are tested")
    # the test's thought count (None: the final stage's own), and the sweep's
    n_test_thoughts = n_thoughts_eval if n_thoughts_eval >= 0 else None
    sweep_counts = parse_counts(thoughts_sweep) if thoughts_sweep else []

    # ---- the model's shape (no weights yet): its positions against the longest sequence, and the
    # memory plan
    mcfg = ckpt["config"] if ckpt else config                          # a checkpoint's own shape
    if ckpt and not resume:
        log(f"model shape from {ckpt_path}: arch {mcfg['arch']}, {mcfg['n_layer']} layers, "
            f"{mcfg['n_head']} heads, n_embd {mcfg['n_embd']}, block_size {mcfg['block_size']} "
            f"(the config's values do not apply)")
    # the embedding rows: a checkpoint's own count first (no marker rows if it had none)
    n_rows = len(tok)
    if ckpt and not had_markers:
        n_rows = n_real
    shape_kw = dict(arch=mcfg["arch"], n_layer=mcfg["n_layer"], n_head=mcfg["n_head"],
                    n_embd=mcfg["n_embd"], block_size=mcfg["block_size"], dropout=mcfg["dropout"],
                    bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                    device_type=device_type)
    with torch.device("meta"):  # the shape only: no memory used, no weights read
        if base == "scratch":
            shape_model = load_model("scratch", n_rows, **shape_kw)
        else:
            shape_model = AutoModelForCausalLM.from_config(base_cfg)
    hf_cfg = shape_model.config
    n_params = sum(p.numel() for p in shape_model.parameters())
    shape_model = None
    # the longest training row, at every stage it can meet, and the longest evaluation: a prompt
    # (the test at each thought count, val at each stage run) plus the tokens generated
    stages_run = set() if eval_only else scheduled
    train_len, idx, idx_stage = longest_training_row(encoded["train"], stages_run, uniform_prob,
                                                     lay)
    eval_lengths = [0]
    for n in [n_test_thoughts] + sweep_counts:
        eval_lengths += [len(p) for p in eval_prompts(encoded["test"], final_stage, lay, n)]
    for st in stages_run:
        eval_lengths += [len(p) for p in eval_prompts(encoded["val"], st, lay)]
    eval_len = max(eval_lengths) + max_new_tokens
    positions = max_positions(hf_cfg)
    if positions and train_len > positions:
        raise UserError(f"training example {idx} is {train_len} tokens at stage {idx_stage}, more "
                        f"than the model's {positions} positions (block_size): raise --block_size "
                        f"(scratch), lower max_latent_stage or c_thought, or drop long examples")
    if positions and eval_len > positions:
        raise UserError(f"the longest evaluation prompt + max_new_tokens={max_new_tokens} is "
                        f"{eval_len} tokens, more than the model's {positions} positions: lower "
                        f"--max_new_tokens or raise block_size")
    unit = 2 if precision == "bf16" else 4                             # bytes per activation value
    kv_cache_bytes = estimate_kv_cache_bytes(hf_cfg, eval_batch_size, eval_len, unit)
    train_tokens = micro_batch_size * train_len
    activations_bytes = estimate_activation_bytes(hf_cfg, train_tokens,
                                                  logit_positions=train_tokens,
                                                  checkpointing=gradient_checkpointing,
                                                  dtype_bytes=unit)
    # FSDP keeps full gradients between the syncs of gradient accumulation; DDP does not
    plan = memory_plan(n_params, mode="fsdp" if fsdp else "ddp", world_size=ddp_world_size,
                       precision=precision, grad_accum=grad_accum if fsdp else 1,
                       kv_cache_bytes=kv_cache_bytes, activations_bytes=activations_bytes,
                       device_bytes=device_memory_bytes(device))
    log(format_memory_plan(plan))
    check_memory_plan(plan)                                            # before any weight is loaded

    # ---- model: scratch, an HF model, a checkpoint of this script (e.g. the CoT stage), or resume
    torch.manual_seed(seed)
    model = load_model(base, n_rows, **shape_kw)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    if new_markers:
        init_markers(model, len(tok), special, source_id)
        src = "fresh random rows"
        if source_id is not None:
            src = f"copies of {tok.decode([source_id])!r}"
        log(f"markers: added, ids {list(special)}, {src}")
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    log(f"model: {base} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    # every thought pass inside one forward: DDP sees one forward per backward
    coconut_model = Coconut(model, feedback_id)
    if fsdp:
        # each decoder layer and the root sharded; the model moves to the device a unit at a time
        bf16 = precision == "bf16" and device_type == "cuda"
        train_model = fsdp_wrap(coconut_model, device_type, bf16=bf16)
    else:
        model.to(device)
        train_model = coconut_model
        if ddp:
            device_ids = [ddp_local_rank] if device_type == "cuda" else None
            train_model = DDP(coconut_model, device_ids=device_ids)
    # AdamW as released: no schedule, no clipping
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    start_epoch, start_step, iter_num, best_val_acc = 0, 0, 0, -1.0
    if resume:
        if fsdp:
            load_full_state_dicts(model, optimizer, ckpt["model"], ckpt["optimizer"])
        else:
            optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, iter_num = ckpt["epoch"], ckpt["iter_num"]
        best_val_acc = ckpt["best_val_acc"]
        start_step = ckpt.get("step_in_epoch", 0)
        # the loaded state brings the old lr; this run's lr is the one it logs
        for group in optimizer.param_groups:
            group.update(lr=learning_rate, weight_decay=weight_decay)
        log(f"resumed from {ckpt_path}: epoch {start_epoch}, step {start_step} of the epoch, "
            f"step {iter_num}")
    ckpt = None                                                        # (frees its tensors)
    log_wandb = wandb_logger(wandb_log, master_process, wandb_project, wandb_run_name, config)
    # what every checkpoint of this run says about itself (ckpt.pt adds where to continue, best.pt
    # its score)
    run_info = {"config": config, "script": "coconut", "base": base, "tokenizer": tok_name,
                "markers": latent_id is not None}
    # evaluation: rank r takes examples r, r+W, ..., so that each is counted exactly once
    mine = slice(ddp_rank, None, ddp_world_size)
    val_golds = [ex["answer"] for ex in splits["val"][mine]]
    test_golds = [ex["answer"] for ex in splits["test"][mine]]
    eval_kw = dict(tok=tok, feedback_id=feedback_id, batch_size=eval_batch_size,
                   max_new_tokens=max_new_tokens, ctx=ctx, device=device)

    # ---- training: each epoch has one stage; every rank draws the same global batches and takes
    # its own block of each
    model.train()
    stop = StopRequest()                                               # Ctrl-C / SIGTERM
    n_steps_list = [len(s) for _, s, _ in encoded["train"]]
    train_epochs = range(start_epoch, num_epochs)
    if eval_only:
        train_epochs = []                                              # straight to the test
    for epoch in train_epochs:
        stage = stage_at[epoch]
        # a resumed epoch continues where it stopped
        first = start_step if epoch == start_epoch else 0
        # the new stage's sequences deserve fresh moments (reset_optimizer)
        if first == 0 and resets_optimizer(epoch, stage_at, reset_optimizer):
            optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate,
                                          weight_decay=weight_decay)
        # seeded by (seed, epoch) only: the same on every rank, and on resume
        stages, perm = epoch_order(seed, epoch, stage, uniform_prob, n_steps_list)
        for step in range(first, steps_per_epoch):
            # dropout reseeded every step, so that resuming at any step is exact
            torch.manual_seed(step_seed(seed, iter_num, ddp_rank))
            t0 = time.time()
            loss_sum, n_tok = 0.0, 0
            batch = perm[step * batch_size:(step + 1) * batch_size]
            # forward and backward on this rank's block of each micro-step: gradient accumulation
            for micro in range(grad_accum):
                block = rank_block(batch, ddp_rank, micro, grad_accum, micro_batch_size)
                rows = [layout(*encoded["train"][i], stages[i], **lay) for i in block]
                # the first thoughts of every row line up in one column: one pass per thought column
                anchors = [anchor(p, latent_id) for p, _ in rows]
                c0, width, cols = None, None, None
                if fsdp:
                    c0, width, cols = aligned_columns(rows, anchors, feedback_id, device)
                batch_tensors = collate(rows, anchors, tok.pad_id, c0, width)
                input_ids, mask, labels = (t.to(device) for t in batch_tensors)
                # the gradients are all-reduced on the last micro-step only
                set_grad_sync(train_model, micro == grad_accum - 1)
                with ctx:
                    loss = train_model(input_ids, mask, labels, cols) / grad_accum
                loss.backward()
                loss_sum += loss.item()
                n_tok += mask.sum().item()
            # log the global batch's loss, not rank 0's share (gloo has no AVG: sum, then divide)
            if ddp:
                stats = all_sum(torch.tensor([loss_sum, n_tok], dtype=torch.float64), device)
                loss_sum, n_tok = stats[0].item() / ddp_world_size, stats[1].item()
            # a diverged step stops before the update; the values are the same on every rank
            gnorm = grad_norm(model)
            if not (math.isfinite(loss_sum) and math.isfinite(gnorm)):
                raise UserError(f"step {iter_num + 1}: loss {loss_sum} and gradient norm {gnorm}: "
                                f"training diverged; stopped before the update, {out_dir}/ckpt.pt "
                                f"keeps the last good weights; lower --learning_rate")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            dt = time.time() - t0
            log(f"step {iter_num}/{steps_per_epoch * num_epochs} | epoch {epoch} stage {stage} "
                f"thoughts {thoughts_at_stage(stage, lay)} | loss {loss_sum:.4f} | "
                f"lr {learning_rate:.1e} | dt {dt * 1000:.0f}ms | tok/s {n_tok / dt:.0f}")
            log_wandb({"loss": loss_sum, "stage": stage, "epoch": epoch, "grad_norm": gnorm},
                      step=iter_num)
            # ckpt.pt every ckpt_interval steps, and when a signal asks to stop (every rank agrees)
            stopping = stop.requested(device)
            at_interval = ckpt_interval > 0 and iter_num % ckpt_interval == 0
            if stopping or at_interval:
                save_resume_point(os.path.join(out_dir, "ckpt.pt"), model, optimizer,
                                  master_process, run_info, epoch=epoch, step_in_epoch=step + 1,
                                  stage=stage_at[epoch], iter_num=iter_num,
                                  best_val_acc=best_val_acc)
            if stopping:
                log(f"stopped by a signal after step {iter_num}: {out_dir}/ckpt.pt saved; continue "
                    f"with --init_from=resume")
                train_model = None                                     # (the wrapper goes first)
                end_distributed()
                sys.exit(0)

        # ---- end of epoch: validation at this stage's layout, then the checkpoints from rank 0
        val_loss = validation_loss(train_model, coconut_model, encoded["val"][mine], stage, lay,
                                   latent_id, tok.pad_id, eval_batch_size, ctx, device)
        prompts = eval_prompts(encoded["val"][mine], stage, lay)
        val_acc, val_tok, _ = greedy_accuracy(model, train_model, prompts, val_golds,
                                              len(encoded["val"]), **eval_kw)
        log(f"epoch {epoch} stage {stage} | val loss {val_loss:.4f} | val acc {val_acc:.4f} | "
            f"tokens {val_tok:.1f}")
        log_wandb({"val_loss": val_loss, "val_acc": val_acc, "val_tokens": val_tok}, step=iter_num)
        # model selection only where every step is latent (stage > max_latent_stage for curriculum
        # methods): at the last stage with steps, long examples still reason in words and the model
        # is not yet a Coconut model
        if stage >= final_stage and val_acc > best_val_acc:
            best_val_acc = val_acc
            best = {**run_info, "epoch": epoch, "stage": stage, "val_acc": val_acc}
            best_sd = gather_full(model.state_dict())  # a collective under FSDP
            write_checkpoint(os.path.join(out_dir, "best.pt"), best, best_sd, iter_num,
                             master_process)
        save_resume_point(os.path.join(out_dir, "ckpt.pt"), model, optimizer, master_process,
                          run_info, epoch=epoch + 1, step_in_epoch=0, stage=stage_at[epoch + 1],
                          iter_num=iter_num, best_val_acc=best_val_acc)

    # a cheap guard: DDP must leave every rank with the same weights
    if ddp and not fsdp:
        log(f"ddp: parameters identical on {ddp_world_size} ranks: {ranks_identical(model)}")
    stop.restore()

    # ---- final: the best-by-val weights (else the last; never a stale best.pt of an earlier run)
    if not eval_only and best_val_acc >= 0:
        if ddp:
            torch.distributed.barrier()                                # rank 0 has written it
        best_sd = load_checkpoint(os.path.join(out_dir, "best.pt"), map_location=device)["model"]
        if fsdp:
            load_full_state_dicts(model, None, best_sd)
        else:
            model.load_state_dict(best_sd)
        best_sd = None
    # a pretrained model's result as a save_pretrained directory, for the usual tools
    if base != "scratch" and not eval_only:
        hf_dir = os.path.join(out_dir, "hf")
        export_hf(model, tok, gather_full(model.state_dict()), hf_dir, master_process)
    # test accuracy at the final stage's layout (or n_thoughts_eval thoughts)
    test_prompts = eval_prompts(encoded["test"][mine], final_stage, lay, n_test_thoughts)
    test_acc, test_tok, texts = greedy_accuracy(model, train_model, test_prompts, test_golds,
                                                len(encoded["test"]), **eval_kw)
    log(f"test acc {test_acc:.4f} | tokens generated {test_tok:.1f} (thoughts included) | "
        f"{len(encoded['test'])} examples")
    log_wandb({"test_acc": test_acc, "test_tokens": test_tok})

    # ---- the paper's analysis: the same model tested with other numbers of thoughts, no retraining
    if thoughts_sweep:
        sweep = []
        for n in sweep_counts:
            prompts = eval_prompts(encoded["test"][mine], final_stage, lay, n)
            acc, n_tokens, _ = greedy_accuracy(model, train_model, prompts, test_golds,
                                               len(encoded["test"]), **eval_kw)
            sweep.append({"thoughts": n, "accuracy": acc, "tokens": n_tokens})
        log("| thoughts | test acc | tokens generated (thoughts included) |\n|---|---|---|")
        for r in sweep:
            log(f"| {r['thoughts']} | {r['accuracy']:.4f} | {r['tokens']:.1f} |")
        if master_process:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "thoughts_sweep.json"), "w") as f:
                json.dump({"init_from": init_from, "method": method,
                           "examples": len(encoded["test"]), "rows": sweep}, f, indent=1)

    # ---- the probe: what each continuous thought encodes, read through the LM head. FSDP: every
    # rank probes its own prompts inside gathered() (a collective); rank 0 prints
    n_probe = probe
    if not (master_process or fsdp):
        n_probe = 0
    with gathered(train_model):
        for p, text in list(zip(test_prompts, texts))[:n_probe]:
            log(f"--- {tok.decode(p, skip_special_tokens=False)!r} -> {text!r}")
            if feedback_id in p:
                probs, ids = probe_thoughts(model, p, latent_id, probe_topk, device)
                for line in probe_lines(tok, probs, ids):
                    log(line)
    train_model = None                                                 # (the wrapper goes first)
    end_distributed()
