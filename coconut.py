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

Launch (the defaults: two-hop questions over a random knowledge graph whose facts are learned in
the weights, a tiny GPT-2 from scratch, minutes on a CPU; the one thought learns the bridge entity):
    python coconut.py                                        # CPU demo (data.py: kgraph)
    python coconut.py config/coconut_prosqa_small.py         # the mechanics on ProsQA-style data
    python coconut.py config/coconut_prosqa.py               # 1 GPU (batch 128 by accumulation)
    torchrun --standalone --nproc_per_node=8 coconut.py config/coconut_gsm8k.py \
        --micro_batch_size=16                                # 8 GPUs; FSDP2: add --fsdp=True
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 \
        --master_port=29500 coconut.py config/coconut_gsm8k.py --micro_batch_size=8  # 2 nodes
The other node: --node_rank=1. Baselines (--method=), thought sweep, all options: docs/coconut.md.
"""

import ast
import dataclasses
import json
import os
import random
import sys
import time

import torch
import torch.nn as nn
from transformers import DynamicCache

from configurator import (UserError, configure, counts, each, exit_cleanly_on_user_error,
                          system_rules)
# (TASKS: what the RULES read)
from data import TASKS, check_coconut_answers, load_splits
from evaluate import coconut_correct
from model import (autocast_ctx, backbone, cache_kwargs, copy_token_rows, decode, left_pad,
                   lm_head, load_model, model_config, position_ids_from_mask, progress_bar,
                   scratch_config, token_logprobs)
from run import (StopRequest, all_sum, check_same_run, distribute, end_distributed, end_training,
                 enable_activation_checkpointing, epoch_path, exit_on_signal, gathered, grad_norm,
                 load_best, load_full_state_dicts, load_run, preflight, print0, require_finite,
                 resume_run, save_hf_export, save_run, set_grad_sync, start, wandb_logger)
from vocab import (build_tokenizer, encode_example, marker_ids, marker_source, markers_present,
                   tokenizer_name)

# -----------------------------------------------------------------------------
# configuration: the defaults are the CPU demo; config/coconut_*.py hold the paper's runs
# I/O
out_dir = "out/coconut"         # ckpt.pt (last, for resume), best.pt (best by val), hf/ (HF export)
overwrite = False               # True: a scratch run may delete out_dir's ckpt.pt / best.pt
ckpt_interval = 200             # also save ckpt.pt every this many optimizer steps (0: epoch ends)
keep_epoch_checkpoints = False  # also epoch_N.pt: the weights after N epochs (log epoch N-1)
init_from = "scratch"           # scratch | resume (out_dir/ckpt.pt) | a .pt of coconut.py | HF
eval_only = False               # evaluate init_from on the test split (and probe), then exit
wandb_log = False               # log to Weights & Biases (imported only when True)
wandb_project = "nanolatent"    # wandb project
wandb_run_name = "coconut"      # wandb run name
# data
task = "kgraph"                 # a data.py task: kgraph, prosqa_small, prosqa, gsm8k_aug, json...
data_path = ""                  # local files, '{split}' -> train/valid/test (prosqa_{split}.json)
split_layout = ""               # one data file without {split}: 'tail:VAL,TEST' holds out its tail
allow_split_overlap = False     # True: a question in two splits is a warning, not an error
n_train = 0                     # examples per split, 0 = the task's default size
n_val = 0                       # val examples: model selection each epoch
n_test = 0                      # test examples: scored once at the end
task_options = "{}"             # generator options, e.g. "{'hops': (2, 3)}"; "{}" for files
tokenizer = ""                  # '' = the model's own (words for scratch) | 'words' | HF name/dir
# method
method = "coconut"              # coconut | cot | no_cot | no_thoughts | pause_as_thought | pause
c_thought = 1                   # thoughts per replaced step (paper: 2 GSM8k, 1 ProsQA/ProntoQA)
epochs_per_stage = 10           # curriculum: epochs per stage (paper: 3 GSM8k, 5 ProsQA/ProntoQA)
max_latent_stage = 1            # last stage with steps left; past it every step is latent
start_stage = 0                 # first stage: 1 after a CoT run; 99 (capped) = "w/o curriculum"
pad_latent_to_max = True        # released: k*c thoughts at stage k even with fewer than k steps
uniform_prob = 0.0              # chance an example trains at a random stage 0..#steps (released 0)
n_thoughts_eval = -1            # thoughts (pauses) at inference; -1 = max_latent_stage * c_thought
thoughts_sweep = ""             # '0,1,2,3': test accuracy at each thought count (paper's analysis)
marker_init = "auto"            # token the marker rows copy ('<<' released); '' = fresh rows
# model (init_from='scratch')
arch = "gpt2"                   # gpt2 | llama
n_layer = 2                     # transformer blocks
n_head = 4                      # attention heads
n_embd = 128                    # width (hidden size)
block_size = 512                # maximum positions
dropout = 0.0                   # dropout of a model from scratch
# optimization (paper: AdamW lr 1e-4, wd 0.01, global batch 128, fp32, no schedule or clipping)
num_epochs = 70                 # total epochs (paper: 25 GSM8k after the CoT run, 50 ProsQA)
batch_size = 128                # GLOBAL batch in examples, all ranks and micro-steps (paper: 128)
micro_batch_size = 128          # examples per rank per forward; accumulation = batch / (micro x W)
learning_rate = 1e-3            # AdamW lr (paper: 1e-4 for pretrained GPT-2; 1e-3 from scratch)
weight_decay = 0.01             # AdamW (paper: 0.01)
reset_optimizer = "stage"       # new AdamW at: stage switches (paper) | epoch (released) | never
precision = "fp32"              # fp32 (released) | bf16 autocast (weights and optimizer stay fp32)
fsdp = False                    # torchrun only: shard weights, gradients and AdamW state (FSDP2)
gradient_checkpointing = False  # recompute activations in the backward; not for method=coconut
# evaluation
eval_batch_size = 64            # prompts per generate call, per rank
max_new_tokens = 8              # paper: 64 GSM8k, 128 others
probe = 4                       # decode the thoughts of this many test examples (0 = off)
probe_topk = 3                  # top-k tokens shown per thought
progress = True                 # progress bars with an ETA for evaluations (rank 0, terminals only)
# system
device = "auto"                 # auto | cpu | cuda | cuda:1 ...
seed = 0                        # data, initial weights and batch order
ddp_timeout = 1800              # seconds a collective (and init_process_group) waits for the others

METHODS = ("coconut", "cot", "no_cot", "no_thoughts", "pause_as_thought", "pause")
MARKER_METHODS = ("coconut", "pause_as_thought", "pause")  # sequences hold the 3 new tokens
CURRICULUM_METHODS = ("coconut", "no_thoughts", "pause_as_thought")

# what a configuration must hold, checked by configurator.py before any work, in this order
RULES = [
    ("task in TASKS", "task={task!r} is unknown; known: {', '.join(TASKS)}"),
    ("isinstance(literal(task_options), dict)", "task_options={task_options!r} must be a dict "
     "literal, e.g. \"{{'min_hops': 2}}\" or \"{{}}\""),
    ("method in METHODS", "method={method!r} is unknown; use one of {', '.join(METHODS)}"),
    ("reset_optimizer in ('stage', 'epoch', 'never')",
     "reset_optimizer={reset_optimizer!r}: use one of 'stage', 'epoch', 'never'"),
    ("precision in ('fp32', 'bf16')", "precision={precision!r}: use one of 'fp32', 'bf16'"),
    ("arch in ('gpt2', 'llama')", "arch={arch!r}: use one of 'gpt2', 'llama'"),
    *system_rules("coconut.py"),
    *each("c_thought epochs_per_stage batch_size micro_batch_size eval_batch_size max_new_tokens "
          "probe_topk n_layer n_head n_embd block_size ddp_timeout", "{key} > 0",
          "{key}={value} must be > 0"),
    ("eval_only or num_epochs > 0",
     "num_epochs={num_epochs} must be > 0 (eval_only=True evaluates without training)"),
    *each("n_train n_val n_test max_latent_stage start_stage probe ckpt_interval learning_rate "
          "weight_decay", "{key} >= 0", "{key}={value} must be >= 0"),
    ("n_thoughts_eval >= -1", "n_thoughts_eval={n_thoughts_eval} must be >= 0, or -1 "
                              "(= max_latent_stage * c_thought)"),
    ("0 <= uniform_prob <= 1", "uniform_prob={uniform_prob} must be in [0, 1]"),
    ("0 <= dropout < 1", "dropout={dropout} must be in [0, 1)"),
    ("n_embd % n_head == 0", "n_embd={n_embd} must be a multiple of n_head={n_head}"),
    ("not (eval_only and init_from == 'scratch')",
     "eval_only=True with init_from='scratch' would score an untrained model: give "
     "--init_from=resume, a .pt checkpoint or a trained model"),
    ("not thoughts_sweep or counts(thoughts_sweep)", "thoughts_sweep={thoughts_sweep!r}: "
     "give thought counts >= 0 separated by commas, e.g. 0,1,2,3"),
    ("not thoughts_sweep or method in MARKER_METHODS", "thoughts_sweep needs thoughts or pauses; "
     "method={method!r} has none (use one of {', '.join(MARKER_METHODS)})"),
    # checkpointed layers drop the KV cache that carries the thought passes (with gradients)
    ("not (gradient_checkpointing and method == 'coconut')",
     "gradient_checkpointing=True does not work with method=coconut: its thought passes carry "
     "a KV cache with gradients, which checkpointed layers drop; use --fsdp=True or a smaller "
     "micro_batch_size instead"),
    ("batch_size % (micro_batch_size * world_size) == 0",
     "batch_size={batch_size} (global) must be a multiple of micro_batch_size={micro_batch_size} "
     "x {world_size} ranks = {micro_batch_size * world_size}: change batch_size, "
     "micro_batch_size or the number of processes"),
    ("not init_from.endswith('.pt') or os.path.isfile(init_from)",
     "init_from={init_from!r}: no such checkpoint file"),
    ("init_from.endswith('.pt') or init_from in ('scratch', 'resume') or "
     "not os.path.isfile(init_from)", "init_from={init_from!r} is a file but not a .pt "
     "checkpoint: give a .pt file of coconut.py, a save_pretrained directory or a hub name"),
]
SHAPE_KEYS = ("arch", "n_layer", "n_head", "n_embd", "block_size", "dropout")  # a model's shape
# what a resumed run must share with its checkpoint (num_epochs, out_dir, eval settings may change)
RESUME_KEYS = SHAPE_KEYS + ("task", "task_options", "data_path", "split_layout", "n_train",
                            "tokenizer", "seed", "method", "c_thought", "epochs_per_stage",
                            "max_latent_stage", "start_stage", "pad_latent_to_max",
                            "uniform_prob", "batch_size")
if __name__ == "__main__":
    exit_cleanly_on_user_error()  # a UserError (a wrong key, file, value): one line, exit 1
    config = configure(globals(), sys.argv[1:], rules=RULES)

# -----------------------------------------------------------------------------
# the curriculum: which tokens an example is at stage k, and what is learned

@dataclasses.dataclass
class Curriculum:
    """What decides an example's tokens at a stage."""
    method: str              # one of METHODS
    c_thought: int           # thoughts per replaced step
    max_latent_stage: int    # the last stage with language steps left
    pad_latent_to_max: bool  # the released rule for examples with fewer steps than the stage
    special: tuple           # (<bot>, <latent>, <eot>) ids, or Nones for the methods without them

def stage_of(epoch, start_stage, epochs_per_stage, max_latent_stage):
    """The scheduled stage of an epoch; stages past max_latent_stage are all the same, so cap at
    max + 1."""
    return min(start_stage + epoch // epochs_per_stage, max_latent_stage + 1)

def layout(q, steps, answer, stage, cur, n_thoughts=None, inference=False):
    """One example at curriculum `stage` as (prompt, target) token lists; the loss is on target
    only. q, answer: token ids (answer ends with eos); steps: list of token-id lists. n_thoughts
    overrides the stage's thought count (inference with a chosen number of thoughts);
    inference=True builds the prompt as the released evaluation does (matters only for
    pad_latent_to_max=False)."""
    bot, latent, eot = cur.special
    # the methods without a curriculum: the stage plays no part
    if cur.method == "cot":                                            # Q S1 .. Sn ### A
        return q, sum(steps, []) + answer
    if cur.method == "no_cot":
        return q, answer
    if cur.method == "pause":                                          # Q + N pause tokens + A
        if n_thoughts is None:
            n_thoughts = cur.max_latent_stage * cur.c_thought
        return q + [latent] * n_thoughts, answer
    # stage k drops the first k steps; past the last stage, all of them
    kept = steps[stage:] if stage <= cur.max_latent_stage else []
    if cur.method == "no_thoughts":                                    # "w/o thought"
        return q, sum(kept, []) + answer
    # coconut and pause_as_thought: c_thought thoughts per dropped step, up to the last stage
    k = min(stage, cur.max_latent_stage)
    # pad_latent_to_max=False, as released: a training stage k <= max_latent_stage still gives k*c
    # thoughts to an example with fewer than k steps; only past the last stage and at inference is
    # k capped by the step count
    if not cur.pad_latent_to_max and (inference or stage > cur.max_latent_stage):
        k = min(k, len(steps))
    n = k * cur.c_thought if n_thoughts is None else n_thoughts
    return q + [bot] + [latent] * n + [eot], sum(kept, []) + answer

def thoughts_at_stage(stage, cur):
    """The thoughts (or pauses) at `stage` of an example with more steps than any stage replaces:
    what the schedule and the step log report."""
    return layout([], [[0]] * 99, [], stage, cur)[0].count(cur.special[1])

def collate(rows, latent_id, pad_id, c0=None, width=None):
    """rows: list of (prompt, target). Left-pad so every row's first thought (the end of a prompt
    without one) sits in the same column c0: thought j of every row is then column c0+j, and one
    tensor op per pass feeds the whole batch. Right-pad the rest. c0, width: at least this anchor
    column and this many columns (FSDP: every rank's batch laid out alike).
    Returns input_ids, attention_mask, labels (B, T)."""
    anchors = [p.index(latent_id) if latent_id in p else len(p) for p, _ in rows]
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
    for c in (input_ids == latent_id).any(0).nonzero().flatten().tolist():  # thought columns
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
    thought and the cached keys/values. latent_id=None: one plain pass. cols (FSDP only): the
    columns to split at, the same on every rank (a split at a token column changes nothing, the
    cache carries it). Returns (last hidden states (B, T, C), cache)."""
    embeds = model.get_input_embeddings()(input_ids)                   # (B, T, C)
    # left padding: each row's positions start at its first real token
    pos = position_ids_from_mask(attention_mask)
    is_latent = torch.zeros_like(input_ids, dtype=torch.bool)          # (B, T)
    if latent_id is not None:
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

def aligned_columns(rows, latent_id, feedback_id, device, fsdp):
    """FSDP: every pass all-gathers each layer, so every rank must run the same passes even when its
    rows hold fewer thoughts. The max over the ranks (a collective) of the anchor column, the length
    after it and the thought count: every rank then lays its micro-batch out alike and splits at the
    same columns. Returns (c0, width, cols) for collate() and the forward; Nones without FSDP."""
    if not fsdp:
        return None, None, None
    anchors = [p.index(latent_id) if latent_id in p else len(p) for p, _ in rows]
    n = max(p.count(feedback_id) for p, _ in rows) if feedback_id is not None else 0
    after = max(len(p) + len(t) - a for (p, t), a in zip(rows, anchors))
    t = torch.tensor([max(anchors), after, n], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    c0, after, n = t.tolist()
    return c0, c0 + after, list(range(c0, c0 + n))

# -----------------------------------------------------------------------------
# inference: latent prefix with the cache, then KV-cached greedy decoding; accuracy over ranks

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
    return tokens, torch.where(stopped, first_eos, tokens.shape[1])

def eval_prompts(rows, stage, cur, n_thoughts=None):
    """The prompts (question + markers + thoughts, as the released evaluation lays them out) of
    encoded examples at `stage`; n_thoughts overrides the stage's thought count."""
    return [layout(q, steps, [], stage, cur, n_thoughts, inference=True)[0] for q, steps, _ in rows]

@dataclasses.dataclass
class Decoding:
    """How the evaluations decode, the same for every split."""
    tok: object              # data.Tokenizer
    latent_id: int           # the thought fed back (None: a plain LM)
    batch_size: int          # prompts per generate call
    max_new_tokens: int
    ctx: object              # autocast (or nullcontext)
    device: str
    progress: bool = False   # a progress bar over the generate calls (rank 0, terminals only)

def greedy_accuracy(model, wrapper, prompts, golds, n_total, dec):
    """(accuracy, mean tokens generated with thoughts, this rank's texts) over all ranks: each rank
    brings its own prompts (examples r, r+W, ...: each counted exactly once, no sampler padding),
    and the counts are summed over the ranks. n_total: the examples of all ranks."""
    n_correct, n_tokens, texts, tok, step = 0, 0, [], dec.tok, dec.batch_size
    model.eval()
    # FSDP: the weights are gathered once for the whole call, so ranks may run different counts
    with dec.ctx, gathered(wrapper):
        for i in progress_bar(range(0, len(prompts), step), dec.progress, "evaluating"):
            batch, answers = prompts[i:i + step], golds[i:i + step]
            tokens, n_gen = generate_answers(model, batch, dec.latent_id, tok.eos_id, tok.pad_id,
                                             dec.max_new_tokens, dec.device)
            for row, n, prompt, gold in zip(tokens.tolist(), n_gen.tolist(), batch, answers):
                texts.append(tok.decode(row[:n]))
                n_correct += coconut_correct(texts[-1], gold)          # exact match after last '#'
                # the paper's "# tokens" counts the thoughts too
                n_tokens += n + prompt.count(dec.latent_id)
    model.train()
    sums = all_sum(torch.tensor([n_correct, n_tokens], dtype=torch.float64), dec.device)
    return sums[0].item() / n_total, sums[1].item() / n_total, texts

@torch.no_grad()
def validation_loss(wrapper, coconut_model, rows, stage, cur, dec):
    """Mean next-token loss per labelled token at the epoch's training layout (the released code
    prints it each epoch): each rank brings its own rows, the sums are added over the ranks."""
    total, count = 0.0, 0
    coconut_model.model.eval()
    with gathered(wrapper):
        for i in range(0, len(rows), dec.batch_size):
            batch = [layout(*ex, stage, cur) for ex in rows[i:i + dec.batch_size]]
            tensors = collate(batch, cur.special[1], dec.tok.pad_id)
            ids, mask, labels = (t.to(dec.device) for t in tensors)
            n = (labels[:, 1:] != -100).sum().item()
            with dec.ctx:
                # the loss is the mean over this batch's n labelled tokens
                total += coconut_model(ids, mask, labels).item() * n
            count += n
    coconut_model.model.train()
    sums = all_sum(torch.tensor([total, count], dtype=torch.float64), dec.device)
    return sums[0].item() / max(sums[1].item(), 1)

# -----------------------------------------------------------------------------
# the paper's analyses: each thought read through the LM head; accuracy against the thought count

@torch.no_grad()
def probe_thoughts(model, prompt, latent_id, k, device):
    """The paper's analysis: each continuous thought read through the LM head. Returns (n, k) probs
    and token ids of the top-k tokens of every thought vector fed back (the hidden state just before
    each <latent>)."""
    input_ids = torch.tensor([prompt], device=device)
    hidden, _ = latent_forward(model, input_ids, torch.ones_like(input_ids), latent_id)
    cols = [i - 1 for i, t in enumerate(prompt) if t == latent_id]
    probs = lm_head(model)(hidden[0, cols]).float().softmax(-1)        # (n, V)
    return probs.topk(min(k, probs.shape[-1]))

def print_probe(model, wrapper, prompts, texts, k, dec):
    """Rank 0 prints each prompt, its output and (coconut) the top-k tokens of each of its thoughts.
    FSDP: every rank probes its own prompts inside gathered() (a collective)."""
    with gathered(wrapper):
        for prompt, text in zip(prompts, texts):
            print0(f"--- {dec.tok.decode(prompt, skip_special_tokens=False)!r} -> {text!r}")
            if dec.latent_id in prompt:
                probs, ids = probe_thoughts(model, prompt, dec.latent_id, k, dec.device)
                for j, (top_p, top_ids) in enumerate(zip(probs.tolist(), ids.tolist())):
                    words = [f"{dec.tok.decode([i], skip_special_tokens=False)!r} {q:.2f}"
                             for i, q in zip(top_ids, top_p)]
                    print0(f"    thought {j + 1}: " + "  ".join(words))

def report_sweep(rows, info, path):
    """The thought sweep as a Markdown table (rank 0 prints) and a json file (rank 0 writes)."""
    table = [f"| {r['thoughts']} | {r['accuracy']:.4f} | {r['tokens']:.1f} |" for r in rows]
    print0("\n".join(["| thoughts | test acc | tokens generated (thoughts included) |",
                      "|---|---|---|"] + table))
    if int(os.environ.get("RANK", 0)) == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({**info, "rows": rows}, f, indent=1)

# -----------------------------------------------------------------------------
# the training loop's decisions, as small functions the loop calls and the tests import

def schedule_lines(stage_at, cur):
    """The stages of a run's epochs (stage_at: one per epoch) as log lines, one per stage."""
    lines = []
    for st in sorted(set(stage_at)):
        eps = [ep for ep, s in enumerate(stage_at) if s == st]
        replaced = "all" if st > cur.max_latent_stage else st
        if cur.method not in CURRICULUM_METHODS:
            replaced = "no"
        lines.append(f"schedule: epochs {eps[0]}-{eps[-1]} {cur.method} stage {st}: "
                     f"{thoughts_at_stage(st, cur)} thoughts/pauses, {replaced} steps replaced")
    return "\n".join(lines)

def epoch_order(seed, epoch, stage, uniform_prob, n_steps_list):
    """(stages, permutation) of an epoch, seeded by (seed, epoch) only: every rank and every resume
    draws the same, so a run resumed mid-epoch continues with the same batches. Each example's
    stage is the scheduled `stage`, or with probability uniform_prob a random stage in 0..#steps of
    that example (released: uniform_prob=0): one rng.random() per example, a randint for the drawn
    ones, in order."""
    rng = random.Random(seed + epoch)
    stages = [stage if rng.random() >= uniform_prob else rng.randint(0, n) for n in n_steps_list]
    return stages, rng.sample(range(len(n_steps_list)), len(n_steps_list))

def rank_block(batch, rank, micro, grad_accum, micro_batch_size):
    """This rank's examples at this micro-step: the global batch is cut into world x grad_accum
    blocks, rank r takes blocks r*grad_accum .. (r+1)*grad_accum-1, so 2 ranks x 1 micro-step == 1
    process x 2 micro-steps."""
    at = (rank * grad_accum + micro) * micro_batch_size
    return batch[at:at + micro_batch_size]

def resets_optimizer(epoch, stage_at, mode):
    """Does epoch `epoch` start with a new AdamW? stage_at: the stage of each epoch. 'epoch': every
    epoch but the first; 'stage': when the stage changes; 'never'."""
    if epoch == 0 or mode == "never":
        return False
    return mode == "epoch" or stage_at[epoch] != stage_at[epoch - 1]

def longest_rows(encoded, stages, uniform_prob, cur, test_counts, max_new_tokens):
    """The longest sequences as preflight's (tokens, what, how to shorten) triples: training (prompt
    + target at every stage a row can be drawn at; with uniform_prob > 0 also any of 0..#steps of
    that row) and evaluation (a prompt + max_new_tokens: the test at each thought count, val at
    each stage run)."""
    best = (0, None, None)
    for i, ex in enumerate(encoded["train"]):
        drawn = set(stages)
        if uniform_prob > 0 and stages:
            drawn |= set(range(len(ex[1]) + 1))
        for st in drawn:
            prompt, target = layout(*ex, st, cur)
            if len(prompt) + len(target) > best[0]:
                best = (len(prompt) + len(target), i, st)
    final = cur.max_latent_stage + 1 if cur.method in CURRICULUM_METHODS else 0
    prompts = [p for n in test_counts for p in eval_prompts(encoded["test"], final, cur, n)]
    prompts += [p for st in stages for p in eval_prompts(encoded["val"], st, cur)]
    return [(best[0], f"training example {best[1]} at stage {best[2]}", "raise --block_size "
             "(scratch), lower max_latent_stage or c_thought, or drop long examples"),
            (max(map(len, prompts), default=0) + max_new_tokens, f"the longest evaluation prompt "
             f"+ max_new_tokens={max_new_tokens}", "lower --max_new_tokens or raise --block_size "
             "(scratch)")]

# -----------------------------------------------------------------------------
if __name__ == "__main__":
    # ---- processes and device; rank 0 claims out_dir (a lock, no silent overwrite)
    resume = init_from == "resume"
    ddp, ddp_rank, ddp_world_size, device = start(out_dir, device, ddp_timeout, resume=resume,
                                                  overwrite=overwrite, claim=not eval_only)
    grad_accum = batch_size // (micro_batch_size * ddp_world_size)
    print0(f"global batch {batch_size} = {micro_batch_size} per micro-step x {grad_accum} "
           f"accumulation x {ddp_world_size} ranks{' (fsdp)' if fsdp else ''}")
    ctx = autocast_ctx(torch.device(device).type, precision)          # fp32 as released, or bf16

    # ---- data: every split, identical on every rank, no question in two splits
    splits = load_splits(task, (n_train, n_val, n_test), path=data_path, seed=seed,
                         split_layout=split_layout, allow_overlap=allow_split_overlap,
                         **ast.literal_eval(task_options))
    check_coconut_answers(splits)                                      # the '#' scoring rule
    steps_per_epoch = len(splits["train"]) // batch_size               # the last partial batch: no
    if steps_per_epoch == 0 and not eval_only:
        raise UserError(f"{len(splits['train'])} training examples < batch_size={batch_size}: "
                        f"lower batch_size or give more data (n_train)")

    # ---- the checkpoint to start from: of this script, and (resume) of this very run
    ckpt, ckpt_path = None, os.path.join(out_dir, "ckpt.pt")
    if resume:  # a resumed run takes the checkpoint's values: a different one is refused
        ckpt = resume_run(out_dir, "coconut")
        check_same_run(ckpt["config"], config, RESUME_KEYS)
    elif init_from.endswith(".pt"):
        ckpt = load_run(init_from, "coconut")
    base = ckpt["base"] if ckpt else init_from                         # 'scratch' or an HF model
    base_cfg = model_config(base) if base != "scratch" else None       # a wrong name fails here
    tok_name = tokenizer_name(tokenizer, base, ckpt.get("tokenizer", "") if ckpt else "")
    tok = build_tokenizer(tok_name, [ex for exs in splits.values() for ex in exs])
    encoded = {s: [encode_example(tok, ex) for ex in exs] for s, exs in splits.items()}
    whose = "" if tokenizer else " (the model's own)"
    print0(f"tokenizer: {tok_name}{whose}")
    print0(f"{task}: {', '.join(f'{s} {len(e)}' for s, e in splits.items())} examples, "
           f"vocabulary {len(tok)}")

    # ---- the markers, only for the methods that use them. A checkpoint of this script brings its
    # own (resume) or has none (the GSM8k CoT stage): then they are added and set after loading
    had_markers = markers_present(tok, ckpt)                           # trained rows are kept
    new_markers = method in MARKER_METHODS and not had_markers
    source_id = marker_source(tok, marker_init, base) if new_markers else None
    n_real = len(tok)                                                  # the vocabulary, no markers
    special = marker_ids(tok) if method in MARKER_METHODS or had_markers else (None, None, None)
    n_rows = n_real if ckpt and not had_markers else len(tok)          # the weights' own rows
    latent_id = special[1]                                             # <bot>, <latent>, <eot>
    # pause_as_thought: <latent> stays a learned token; only coconut feeds hidden states back
    feedback_id = latent_id if method == "coconut" else None

    # ---- the curriculum: the stage of every epoch (and of the epoch a last checkpoint resumes at)
    cur = Curriculum(method, c_thought, max_latent_stage, pad_latent_to_max, special)
    final_stage = max_latent_stage + 1 if method in CURRICULUM_METHODS else 0
    stage_at = [0] * (num_epochs + 1)
    if method in CURRICULUM_METHODS:
        stage_at = [stage_of(ep, start_stage, epochs_per_stage, max_latent_stage)
                    for ep in range(num_epochs + 1)]
    scheduled = sorted(set(stage_at[:num_epochs]))
    print0(schedule_lines(stage_at[:num_epochs], cur))
    if final_stage not in scheduled and not eval_only:
        print0(f"note: no epoch reaches the final stage {final_stage}, so no best.pt: the last "
               f"weights are tested")
    n_test_thoughts = n_thoughts_eval if n_thoughts_eval >= 0 else None  # None: the final stage's
    sweep_counts = counts(thoughts_sweep) or []

    # ---- the model's shape (no weights yet): positions against the longest sequences, memory plan
    shape = ckpt["config"] if ckpt else config                         # a checkpoint's own shape
    if ckpt and not resume:
        print0(f"model shape from {init_from}: arch {shape['arch']}, {shape['n_layer']} layers, "
               f"{shape['n_head']} heads, n_embd {shape['n_embd']}, block_size "
               f"{shape['block_size']} (the config's values do not apply)")
    shape_kw = {**{k: shape[k] for k in SHAPE_KEYS}, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                "pad_id": tok.pad_id}
    longest = longest_rows(encoded, [] if eval_only else scheduled, uniform_prob, cur,
                           [n_test_thoughts] + sweep_counts, max_new_tokens)
    (train_len, *_), (eval_len, *_) = longest
    # (FSDP keeps full gradients between the syncs of gradient accumulation; DDP does not)
    memory = dict(fsdp=fsdp, precision=precision, grad_accum=grad_accum,
                  kv_cache=(eval_batch_size, eval_len),
                  activations=(micro_batch_size * train_len, micro_batch_size * train_len,
                               gradient_checkpointing))
    hf_cfg = base_cfg
    if base == "scratch":
        hf_cfg = scratch_config(n_rows, **shape_kw)
    preflight(hf_cfg, device, longest, memory, None if eval_only else out_dir,
              extra_weights=num_epochs if keep_epoch_checkpoints else 0)

    # ---- model: scratch, an HF model, a checkpoint of this script (e.g. the CoT stage), or resume
    torch.manual_seed(seed)
    model = load_model(base, n_rows, device_type=torch.device(device).type, **shape_kw)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    if new_markers:
        copy_token_rows(model, len(tok), special, source_id)         # as released
        src = "fresh random rows" if source_id is None else f"copies of {tok.decode([source_id])!r}"
        print0(f"markers: added, ids {list(special)}, {src}")
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    print0(f"model: {base} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    # every thought pass inside one forward: DDP sees one forward per backward. FSDP: each decoder
    # layer and the root sharded; the model moves to the device a unit at a time
    coconut_model = Coconut(model, feedback_id)
    train_model = distribute(coconut_model, device, fsdp, bf16=precision == "bf16")
    # AdamW as released: no schedule, no clipping
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    start_epoch, start_step, iter_num, best_val_acc = 0, 0, 0, -1.0
    if resume:
        load_full_state_dicts(model, optimizer, ckpt["model"], ckpt["optimizer"])
        start_epoch, start_step = ckpt["epoch"], ckpt.get("step_in_epoch", 0)
        iter_num, best_val_acc = ckpt["iter_num"], ckpt["best_val_acc"]
        # the loaded state brings the old lr; this run's lr is the one it logs
        for group in optimizer.param_groups:
            group.update(lr=learning_rate, weight_decay=weight_decay)
        print0(f"resumed from {ckpt_path}: epoch {start_epoch}, step {start_step} of the epoch, "
               f"step {iter_num}")
    ckpt = None                                                        # (frees its tensors)
    log_wandb = wandb_logger(wandb_log, wandb_project, wandb_run_name, config)
    # what every checkpoint of this run says about itself (ckpt.pt adds where to continue, best.pt
    # its score)
    run_info = {"config": config, "script": "coconut", "base": base, "tokenizer": tok_name,
                "markers": latent_id is not None}
    # evaluation: rank r takes examples r, r+W, ..., so that each is counted exactly once
    mine = slice(ddp_rank, None, ddp_world_size)
    golds = {s: [ex["answer"] for ex in splits[s][mine]] for s in ("val", "test")}
    dec = Decoding(tok, feedback_id, eval_batch_size, max_new_tokens, ctx, device, progress)

    # ---- training: each epoch has one stage; every rank draws the same global batches and takes
    # its own block of each
    model.train()
    stop = StopRequest()                                               # Ctrl-C / SIGTERM
    n_steps_list = [len(s) for _, s, _ in encoded["train"]]
    for epoch in range(start_epoch, 0 if eval_only else num_epochs):
        stage = stage_at[epoch]
        first = start_step if epoch == start_epoch else 0              # a resumed epoch continues
        # the new stage's sequences deserve fresh moments (reset_optimizer)
        if first == 0 and resets_optimizer(epoch, stage_at, reset_optimizer):
            optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate,
                                          weight_decay=weight_decay)
        # seeded by (seed, epoch) only: the same on every rank, and on resume
        stages, perm = epoch_order(seed, epoch, stage, uniform_prob, n_steps_list)
        for step in range(first, steps_per_epoch):
            # dropout reseeded every step from (seed, step, rank): resuming at any step is exact
            torch.manual_seed((seed * 1_000_003 + iter_num) * 1009 + ddp_rank)
            t0 = time.time()
            loss_sum, n_tok = 0.0, 0
            batch = perm[step * batch_size:(step + 1) * batch_size]
            # forward and backward on this rank's block of each micro-step: gradient accumulation
            for micro in range(grad_accum):
                block = rank_block(batch, ddp_rank, micro, grad_accum, micro_batch_size)
                rows = [layout(*encoded["train"][i], stages[i], cur) for i in block]
                # the first thoughts of every row line up in one column: one pass per thought column
                # (FSDP: the same columns on every rank, so that every rank runs the same passes)
                c0, width, cols = aligned_columns(rows, latent_id, feedback_id, device, fsdp)
                input_ids, mask, labels = (t.to(device) for t in
                                           collate(rows, latent_id, tok.pad_id, c0, width))
                # the gradients are all-reduced on the last micro-step only
                set_grad_sync(train_model, micro == grad_accum - 1)
                with ctx:
                    loss = train_model(input_ids, mask, labels, cols) / grad_accum
                loss.backward()
                loss_sum += loss.item()
                n_tok += mask.sum().item()
            # log the global batch's loss, not rank 0's share (gloo has no AVG: sum, then divide)
            stats = all_sum(torch.tensor([loss_sum, n_tok], dtype=torch.float64), device)
            loss_sum, n_tok = stats[0].item() / ddp_world_size, stats[1].item()
            # a diverged step stops before the update; the values are the same on every rank
            gnorm = grad_norm(model)
            require_finite(f"step {iter_num + 1}", loss_sum, gnorm, ckpt_path)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            dt = time.time() - t0
            print0(f"step {iter_num}/{steps_per_epoch * num_epochs} | epoch {epoch} stage {stage} "
                   f"thoughts {thoughts_at_stage(stage, cur)} | loss {loss_sum:.4f} | "
                   f"lr {learning_rate:.1e} | dt {dt * 1000:.0f}ms | tok/s {n_tok / dt:.0f}")
            log_wandb({"loss": loss_sum, "stage": stage, "epoch": epoch, "grad_norm": gnorm},
                      step=iter_num)
            # ckpt.pt every ckpt_interval steps, and when a signal asks to stop (every rank agrees)
            stopping = stop.requested(device)
            if stopping or (ckpt_interval > 0 and iter_num % ckpt_interval == 0):
                where = dict(epoch=epoch, step_in_epoch=step + 1, stage=stage, iter_num=iter_num,
                             best_val_acc=best_val_acc)
                save_run(ckpt_path, {**run_info, **where}, model, optimizer)
            if stopping:
                train_model = None                                     # (the wrapper goes first)
                exit_on_signal(stop, f"after step {iter_num}: {ckpt_path} saved")

        # ---- end of epoch: validation at this stage's layout, then the checkpoints from rank 0
        val_loss = validation_loss(train_model, coconut_model, encoded["val"][mine], stage, cur,
                                   dec)
        prompts = eval_prompts(encoded["val"][mine], stage, cur)
        val_acc, val_tok, _ = greedy_accuracy(model, train_model, prompts, golds["val"],
                                              len(encoded["val"]), dec)
        print0(f"epoch {epoch} stage {stage} | val loss {val_loss:.4f} | val acc {val_acc:.4f} | "
               f"tokens {val_tok:.1f}")
        log_wandb({"val_loss": val_loss, "val_acc": val_acc, "val_tokens": val_tok}, step=iter_num)
        done = {**run_info, "epoch": epoch, "stage": stage, "val_acc": val_acc,
                "iter_num": iter_num}
        # model selection only where every step is latent (stage > max_latent_stage for curriculum
        # methods): at the last stage with steps, long examples still reason in words and the model
        # is not yet a Coconut model
        if stage >= final_stage and val_acc > best_val_acc:
            best_val_acc = val_acc
            save_run(os.path.join(out_dir, "best.pt"), done, model)
        # epoch_N.pt: the weights after N epochs (this is log epoch N-1), as the released
        # checkpoint_N; a starting point for another run (init_from), like best.pt
        if keep_epoch_checkpoints:
            save_run(epoch_path(out_dir, epoch + 1), done, model)
        where = dict(epoch=epoch + 1, step_in_epoch=0, stage=stage_at[epoch + 1],
                     iter_num=iter_num, best_val_acc=best_val_acc)
        save_run(ckpt_path, {**run_info, **where}, model, optimizer)
    end_training(stop, model, fsdp)

    # ---- final: the best-by-val weights (else the last; never a stale best.pt of an earlier run)
    if not eval_only and best_val_acc >= 0:
        load_best(model, out_dir, device)
    # a pretrained model's result as a save_pretrained directory, for the usual tools
    if base != "scratch" and not eval_only:
        save_hf_export(model, tok, os.path.join(out_dir, "hf"))
    # test accuracy at the final stage's layout (or n_thoughts_eval thoughts)
    test_prompts = eval_prompts(encoded["test"][mine], final_stage, cur, n_test_thoughts)
    test_acc, test_tok, texts = greedy_accuracy(model, train_model, test_prompts, golds["test"],
                                                len(encoded["test"]), dec)
    print0(f"test acc {test_acc:.4f} | tokens generated {test_tok:.1f} (thoughts included) | "
           f"{len(encoded['test'])} examples")
    log_wandb({"test_acc": test_acc, "test_tokens": test_tok})

    # ---- the paper's analyses: the same model tested with other numbers of thoughts (no
    # retraining), and what each continuous thought encodes, read through the LM head
    sweep = []
    for n in sweep_counts:
        prompts = eval_prompts(encoded["test"][mine], final_stage, cur, n)
        acc, n_tokens, _ = greedy_accuracy(model, train_model, prompts, golds["test"],
                                           len(encoded["test"]), dec)
        sweep.append({"thoughts": n, "accuracy": acc, "tokens": n_tokens})
    if sweep:
        info = {"init_from": init_from, "method": method, "examples": len(encoded["test"])}
        report_sweep(sweep, info, os.path.join(out_dir, "thoughts_sweep.json"))
    n_probe = probe if (ddp_rank == 0 or fsdp) else 0
    print_probe(model, train_model, test_prompts[:n_probe], texts[:n_probe], probe_topk, dec)
    train_model = None                                                 # (the wrapper goes first)
    end_distributed()
