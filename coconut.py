"""
Coconut: chain of continuous thought (Hao et al., "Training Large Language Models to Reason in a Continuous Latent
Space", arXiv 2412.06769), and its baselines, in one script.

A continuous thought is not a token: at a thought position t the input embedding is the model's own last hidden
state (after the final norm) at position t-1,

    e_t = h_{t-1}                                                      (thought feedback, no sampling, no detach)
    L   = - sum_{t > <eot>} log p(x_t | x_<t, thoughts)                (loss only on what follows the thoughts)

so n thoughts take n+1 sequential forward passes; with a KV cache each position is still encoded once. A staged
curriculum trains it: stage 0 is plain chain of thought `Q\\n S1\\n ... ### A<eos>`; at stage k the first k steps are
replaced by k*c_thought thoughts between <bot> and <eot>; past max_latent_stage every step is gone.

Launch (the defaults: a small generated ProsQA-style task, a tiny GPT-2 from scratch, minutes on a CPU):
    python coconut.py                                                   # CPU demo
    python coconut.py config/coconut_prosqa.py                          # 1 GPU (global batch 128 by accumulation)
    torchrun --standalone --nproc_per_node=8 coconut.py config/coconut_gsm8k.py --micro_batch_size=16
    torchrun --standalone --nproc_per_node=8 coconut.py config/coconut_gsm8k.py --fsdp=True   # sharded (FSDP2)
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \
        coconut.py config/coconut_gsm8k.py --micro_batch_size=8         # and --node_rank=1 on the second node
Methods (--method=, or add an overlay such as config/coconut_pause.py after a task preset):
    coconut           thoughts fed back, curriculum              cot      Q S1..Sn A, stage 0 throughout
    pause_as_thought  same data, <latent> a learned token        no_cot   Q A
    no_thoughts       curriculum deletes steps, nothing instead   pause    Q <latent>xN A, no curriculum
"w/o curriculum" is coconut at the final stage from the first epoch: --start_stage=99 (capped).
Accuracy against the number of inference thoughts (no retraining); bf16 autocast instead of fp32:
    python coconut.py config/coconut_prosqa.py --eval_only=True \
        --init_from=out/prosqa_coconut/best.pt --thoughts_sweep=0,1,2,3,4,5,6
    torchrun --standalone --nproc_per_node=4 coconut.py config/coconut_prosqa.py --precision=bf16
"""

import ast
import datetime
import gc
import json
import math
import os
import sys
import time
import random

import torch
import torch.nn as nn
from torch.distributed import init_process_group, destroy_process_group, all_reduce
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from configurator import UserError
from data import (load_task, build_tokenizer, check_split_overlap, question_text, step_text, answer_text,
                  COCONUT_SPECIAL_TOKENS, TASKS)
from evaluate import coconut_correct

from model import (load_model, backbone, lm_head, left_pad, position_ids_from_mask, token_logprobs, decode,
                   autocast_ctx, cache_kwargs, save_checkpoint, load_checkpoint, prepare_out_dir, StopRequest,
                   check_same_run, nonfinite_names, fsdp_wrap, gathered, set_grad_sync, gather_full,
                   load_full_state_dicts, save_pretrained_full, enable_activation_checkpointing, memory_plan,
                   format_memory_plan, check_memory_plan, device_memory_bytes, estimate_kv_cache_bytes,
                   estimate_activation_bytes)

# -----------------------------------------------------------------------------
# configuration: the defaults are the CPU demo; config/coconut_*.py hold the paper's runs
# I/O
out_dir = "out/coconut"         # ckpt.pt (last, for resume), best.pt (best by val), hf/ (save_pretrained export)
overwrite = False               # a scratch run into an out_dir holding ckpt.pt/best.pt: True deletes them, else error
ckpt_interval = 200             # also save ckpt.pt every this many optimizer steps (0 = at epoch ends only)
init_from = "scratch"           # 'scratch' | 'resume' (out_dir/ckpt.pt) | path/to/ckpt.pt (e.g. a CoT run) | HF name or dir
eval_only = False               # evaluate init_from on the test split (and probe), then exit
wandb_log = False               # log to Weights & Biases (imported only when True)
wandb_project = "nanolatent"
wandb_run_name = "coconut"
# data
task = "prosqa_small"           # a data.load_task name: prosqa_small, prosqa, prontoqa, gsm8k_aug, json, ...
data_path = ""                  # local data file; '{split}' -> train/valid/test as in the released files (data/prosqa_{split}.json)
split_layout = ""               # one data file without {split}: 'tail:VAL,TEST' holds out its last rows (else refused)
n_train = 0                     # examples per split, 0 = the task's default size
n_val = 0
n_test = 0
task_options = "{'min_nodes': 6, 'max_nodes': 8, 'min_hops': 2, 'max_hops': 3}"  # generator knobs (a dict literal; "{}" for files)
tokenizer = ""                  # '' = the model's own (a word vocabulary for scratch, init_from's for an HF model,
                                # a checkpoint's own); 'words' = closed word vocabulary of the task; or an HF name/dir
# method
method = "coconut"              # coconut | cot | no_cot | no_thoughts | pause_as_thought | pause
c_thought = 1                   # thoughts per replaced step (paper: 2 for GSM8k, 1 for ProsQA/ProntoQA)
epochs_per_stage = 3            # curriculum: epochs per stage (paper: 3 GSM8k, 5 ProsQA/ProntoQA)
max_latent_stage = 3            # last stage with steps left; past it all steps are dropped (paper: 3 GSM8k, 6 ProsQA)
start_stage = 0                 # first stage: 1 when continuing from a CoT run; 99 (capped) = "w/o curriculum"
pad_latent_to_max = True        # True (released default): k*c thoughts at stage k whatever the
                                # step count; False: min(k, #steps)*c past the last stage and at
                                # inference (training stages k <= max_latent_stage keep k*c)
uniform_prob = 0.0              # chance that an example trains at a random stage in 0..#steps instead (released: 0)
n_thoughts_eval = -1            # thoughts at inference (and pause tokens); -1 = max_latent_stage * c_thought
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
# optimization (paper: AdamW lr 1e-4, wd 0.01, global batch 128, fp32/bf16, no schedule, no clipping)
num_epochs = 15                 # total epochs (paper: 25 GSM8k after the CoT run, 50 ProsQA/ProntoQA)
batch_size = 32                 # GLOBAL batch in examples, over all ranks and micro-steps (paper: 128)
micro_batch_size = 32           # examples per rank per forward; grad accumulation = batch / (micro * world)
learning_rate = 1e-3            # AdamW lr (paper: 1e-4 for pretrained GPT-2; a tiny model from scratch likes 1e-3)
weight_decay = 0.01
reset_optimizer = "stage"       # 'stage': new AdamW at each stage switch (paper text); 'epoch':
                                # every epoch (released coconut configs); 'never' (released GSM8k CoT)
precision = "fp32"              # 'fp32' (released) | 'bf16': bf16 autocast; weights, optimizer and
                                # log-probs stay fp32
fsdp = False                    # torchrun only: shard weights, gradients and AdamW state over the ranks (FSDP2)
gradient_checkpointing = False  # recompute activations in the backward; not for method=coconut (cached passes)
# evaluation
eval_batch_size = 64            # prompts per generate call, per rank
max_new_tokens = 48             # paper: 64 GSM8k, 128 others
probe = 2                       # print the top-k tokens of each thought for this many test examples (0 = off)
probe_topk = 3
# system
device = "auto"                 # auto | cpu | cuda | cuda:1 ...
seed = 0
ddp_timeout = 1800              # seconds a collective (and init_process_group) waits for the other ranks
METHODS = ("coconut", "cot", "no_cot", "no_thoughts", "pause_as_thought", "pause")
MARKER_METHODS = ("coconut", "pause_as_thought", "pause")  # the methods whose sequences hold the 3 new tokens
if __name__ == "__main__":
    from configurator import configure, exit_cleanly_on_user_error
    exit_cleanly_on_user_error()  # a UserError (a wrong key, file, value) is one line `error: ...`, exit 1
    config = configure(globals(), sys.argv[1:])

# -----------------------------------------------------------------------------
# the curriculum: which tokens an example is at stage k, and what is learned

def stage_of(epoch, start_stage, epochs_per_stage, max_latent_stage):
    """The scheduled stage of an epoch; stages past max_latent_stage are all the same, so cap at max + 1."""
    return min(start_stage + epoch // epochs_per_stage, max_latent_stage + 1)

def layout(q, steps, answer, stage, *, method, c_thought, max_latent_stage, pad_latent_to_max, n_pause, special,
           n_thoughts=None, inference=False):
    """One example at curriculum `stage` as (prompt, target) token lists; the loss is on target only.
    q, answer: token ids (answer ends with eos); steps: list of token-id lists; special = (bot, latent, eot) ids.
    n_thoughts overrides the stage's thought count (inference with a chosen number of thoughts); inference=True
    builds the prompt as the released evaluation does (matters only for pad_latent_to_max=False)."""
    bot, latent, eot = special
    flat = lambda ss: [t for s in ss for t in s]
    if method == "cot":                                           # Q S1 .. Sn ### A, stage fixed at 0
        return q, flat(steps) + answer
    if method == "no_cot":
        return q, answer
    if method == "pause":                                         # Q + N pause tokens + A, no curriculum
        return q + [latent] * (n_pause if n_thoughts is None else n_thoughts), answer
    kept = steps[stage:] if stage <= max_latent_stage else []     # stage k drops k steps; past the last stage, all
    if method == "no_thoughts":                                   # "w/o thought": nothing in their place
        return q, flat(kept) + answer
    k = min(stage, max_latent_stage)                              # thoughts stop growing at the last stage
    # pad_latent_to_max=False, as released: a training stage k <= max_latent_stage still gives k*c thoughts to an
    # example with fewer than k steps; only past the last stage and at inference is k capped by the step count
    if not pad_latent_to_max and (inference or stage > max_latent_stage):
        k = min(k, len(steps))
    n = k * c_thought if n_thoughts is None else n_thoughts
    return q + [bot] + [latent] * n + [eot], flat(kept) + answer  # coconut and pause_as_thought

def marker_ids(tok):
    """Add the three markers to the tokenizer; returns (<bot>, <latent>, <eot>) ids, the order layout() takes."""
    bot, eot, latent = tok.add_special_tokens(COCONUT_SPECIAL_TOKENS)  # data.py lists start-, end-latent, latent
    return bot, latent, eot

def markers_present(tok, ckpt):
    """Do the weights to load already have marker rows? A checkpoint of this script says so (older ones always
    had them); a save_pretrained export of this script (init_from=out/.../hf) has them when its tokenizer does."""
    if ckpt is not None:
        return ckpt.get("markers", True)
    vocab = tok.hf.get_vocab()
    return all(t in vocab for t in COCONUT_SPECIAL_TOKENS)

def marker_source(tok, marker_init, base):
    """The id of the token whose embedding the new markers copy, or None for fresh random rows.
    'auto': '<<' as released (one token in GPT-2's vocabulary), else '<', for pretrained weights; None for a
    model from scratch, whose rows are all random anyway. Fails, naming the key, unless the text is one token."""
    if marker_init == "auto":
        if base == "scratch":
            return None
        texts = ["<<", "<"]
    else:
        texts = [marker_init] if marker_init else []
    for text in texts:
        try:
            ids = tok.encode(text)
        except ValueError:  # the word vocabulary refuses words it does not have
            ids = []
        if len(ids) == 1:
            return ids[0]
    if texts:
        raise UserError(f"marker_init={marker_init!r}: {' / '.join(map(repr, texts))} is not exactly one token "
                         f"in this vocabulary; set --marker_init to a text that is one token, or '' for fresh rows")
    return None

def init_markers(model, n_vocab, special, source_id):
    """Give the markers embedding rows: grow the matrices to n_vocab rows if needed (a checkpoint without
    markers), then copy the source token's row into each marker row, as released. A fresh row in a pretrained
    tied head would get a logit near 0, far above real tokens' (strongly negative) logits: training would start
    by predicting markers. GPT-2 ties head and input embedding, so one write sets both; an untied head gets
    its own source row."""
    if model.get_input_embeddings().weight.shape[0] < n_vocab:
        model.resize_token_embeddings(n_vocab, mean_resizing=False)
    if source_id is None:
        return
    inp, out = model.get_input_embeddings().weight, lm_head(model).weight
    with torch.no_grad():
        for w in ([inp] if out is inp else [inp, out]):
            w[list(special)] = w[source_id].clone()

def encode_example(tok, ex):
    """(question, steps, answer + eos) token lists. The question is encoded as the tokenizer encodes a text on
    its own (add_special_tokens=True), as released: GPT-2 and the word vocabulary add no BOS, Llama adds one."""
    q = tok.encode(question_text(ex), add_special_tokens=True)
    return q, [tok.encode(step_text(st)) for st in ex["steps"]], tok.encode(answer_text(ex)) + [tok.eos_id]

def collate(rows, anchors, pad_id, c0=None, width=None):
    """rows: list of (prompt, target); anchors: where each row's first thought goes (len(prompt) if none).
    Left-pad so every anchor sits in the same column c0: thought j of every row is then column c0+j, and one
    tensor op per pass feeds the whole batch. Right-pad the rest. c0, width: at least this anchor column and
    this many columns (FSDP: every rank's batch laid out alike). Returns input_ids, attention_mask, labels (B, T)."""
    c0 = max(max(anchors), c0 or 0)
    left = [c0 - a for a in anchors]
    T = max(max(l + len(p) + len(t) for l, (p, t) in zip(left, rows)), width or 0)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)  # -100: no loss (question, markers, thoughts, pad)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (l, (p, t)) in enumerate(zip(left, rows)):
        input_ids[i, l:l + len(p) + len(t)] = torch.tensor(p + t)
        labels[i, l + len(p):l + len(p) + len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, l:l + len(p) + len(t)] = 1
    return input_ids, mask, labels

def anchor(prompt, latent_id):
    return prompt.index(latent_id) if latent_id in prompt else len(prompt)

# -----------------------------------------------------------------------------
# the latent forward: one pass over the prefix, one cached pass per thought column, one over the rest

def latent_forward(model, input_ids, attention_mask, latent_id, cols=None):
    """Last hidden states (B, T, C) of a batch whose <latent> positions take the previous position's last hidden
    state as input embedding (e_t = h_{t-1}). Columns holding a thought in any row split the sequence into passes;
    the DynamicCache keeps every earlier position, so each position is encoded once and gradients flow through
    every thought and the cached keys/values. latent_id=None: one plain pass. cols: the columns to split at, a
    superset of the thought columns (FSDP: the same passes on every rank; a split at a token column changes
    nothing, the cache carries it). Returns (hidden, cache)."""
    embeds = model.get_input_embeddings()(input_ids)                    # (B, T, C)
    pos = position_ids_from_mask(attention_mask)                       # left padding: positions start at each row's text
    is_latent = input_ids == latent_id if latent_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
    if cols is None:
        cols = is_latent.any(0).nonzero().flatten().tolist()           # thought columns (one sync per forward)
    T = input_ids.shape[1]
    bounds = sorted({0, T} | set(cols) | {c + 1 for c in cols})        # [0,c0) [c0,c0+1) ... [c_last+1,T)
    cache, hs = DynamicCache(config=model.config), []
    for s, e in zip(bounds[:-1], bounds[1:]):
        x = embeds[:, s:e]                                             # (B, e-s, C)
        if s in cols:  # a thought column: rows with <latent> here get h_{s-1}, the others keep their token
            x = torch.where(is_latent[:, s:e, None], hs[-1][:, -1:].to(x.dtype), x)
        out = backbone(model)(inputs_embeds=x, attention_mask=attention_mask[:, :e], position_ids=pos[:, s:e],
                              use_cache=True, **cache_kwargs(backbone(model), cache))  # full mask so far
        hs.append(out.last_hidden_state)                               # after the final norm
    return torch.cat(hs, dim=1), cache

class Coconut(nn.Module):
    """The model plus thought feedback, in one forward so that DDP sees one forward per backward.
    latent_id=None (every method but coconut, pause_as_thought included) makes it a plain LM."""
    def __init__(self, model, latent_id):
        super().__init__()
        self.model, self.latent_id = model, latent_id

    def forward(self, input_ids, attention_mask, labels, cols=None):
        hidden, _ = latent_forward(self.model, input_ids, attention_mask, self.latent_id, cols)  # (B, T, C)
        targets, mask = labels[:, 1:], labels[:, 1:] != -100           # h_t predicts x_{t+1}
        logp = token_logprobs(self.model, hidden[:, :-1], targets.clamp(min=0), mask)  # LM head only where labelled
        return -logp.sum() / mask.sum().clamp(min=1)                   # mean next-token cross-entropy

# -----------------------------------------------------------------------------
# inference: latent prefix with the cache, then KV-cached greedy decoding; the thought probe

@torch.no_grad()
def generate(model, prompts, latent_id, eos_id, pad_id, max_new_tokens, device):
    """Greedy continuations (B, T_new) of a list of prompts ending in their thoughts (same count in every row, so
    plain left padding aligns them) and each row's number of generated tokens up to and including eos."""
    input_ids, mask = left_pad(prompts, pad_id, device)
    hidden, cache = latent_forward(model, input_ids, mask, latent_id)
    last_logits = lm_head(model)(hidden[:, -1]).float()                # (B, V)
    tokens, stopped = decode(model, last_logits, cache, mask, max_new_tokens, stop_sequences=[[eos_id]], pad_id=pad_id)
    first_eos = (tokens == eos_id).float().argmax(1) + 1
    return tokens, torch.where(stopped, first_eos, torch.full_like(first_eos, tokens.shape[1]))

@torch.no_grad()
def probe_thoughts(model, prompt, latent_id, k, device):
    """The paper's analysis: each continuous thought read through the LM head. Returns (n, k) probs and token ids
    of the top-k tokens of every thought vector fed back (the hidden state just before each <latent>)."""
    input_ids = torch.tensor([prompt], device=device)
    hidden, _ = latent_forward(model, input_ids, torch.ones_like(input_ids), latent_id)
    cols = [i - 1 for i, t in enumerate(prompt) if t == latent_id]
    return lm_head(model)(hidden[0, cols]).float().softmax(-1).topk(k)

def evaluate_rank(model, prompts, answers, tok, latent_id, batch_size, max_new_tokens, device):
    """Greedy accuracy on this rank's share of the prompts: (n_correct, n_tokens incl. thoughts, texts)."""
    n_correct, n_tokens, texts = 0, 0, []
    for i in range(0, len(prompts), batch_size):
        tokens, n_gen = generate(model, prompts[i:i + batch_size], latent_id, tok.eos_id, tok.pad_id,
                                 max_new_tokens, device)
        for row, n, p, gold in zip(tokens.tolist(), n_gen.tolist(), prompts[i:i + batch_size], answers[i:i + batch_size]):
            texts.append(tok.decode(row[:n]))
            n_correct += coconut_correct(texts[-1], gold)              # exact match after the last '#'
            n_tokens += n + p.count(latent_id)                         # the paper's "# tokens" counts thoughts
    return n_correct, n_tokens, texts

def check_config(cfg, world_size):
    """Fail before any work, with the numbers to change: every key that has a wrong value or kind, one at a time.
    Returns the gradient accumulation steps."""
    def need(ok, message):
        if not ok:
            raise UserError(message)
    # the task first: its options are its own
    need(cfg["task"] in TASKS, f"task={cfg['task']!r} is unknown; known: {', '.join(TASKS)}")
    try:
        opts = ast.literal_eval(cfg["task_options"])
    except (ValueError, SyntaxError):
        opts = None
    need(isinstance(opts, dict), f"task_options={cfg['task_options']!r} must be a dict literal, e.g. "
                                 f"\"{{'min_hops': 2}}\" or \"{{}}\"")
    need(cfg["method"] in METHODS, f"method={cfg['method']!r} is unknown; use one of {', '.join(METHODS)}")
    for key, choices in (("reset_optimizer", ("stage", "epoch", "never")), ("precision", ("fp32", "bf16")),
                         ("arch", ("gpt2", "llama"))):
        need(cfg[key] in choices, f"{key}={cfg[key]!r}: use one of {', '.join(map(repr, choices))}")
    dev = cfg["device"]
    need(dev in ("auto", "cpu") or dev.split(":")[0] == "cuda",
         f"device={dev!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    # sizes, counts and intervals: positive, or the documented 0 / -1
    positive = ["c_thought", "epochs_per_stage", "batch_size", "micro_batch_size", "eval_batch_size",
                "max_new_tokens", "probe_topk", "n_layer", "n_head", "n_embd", "block_size", "ddp_timeout"]
    if not cfg["eval_only"]:
        positive.append("num_epochs")
    for key in positive:
        hint = " (eval_only=True evaluates without training)" if key == "num_epochs" else ""
        need(cfg[key] > 0, f"{key}={cfg[key]} must be > 0{hint}")
    for key in ("n_train", "n_val", "n_test", "max_latent_stage", "start_stage", "probe", "ckpt_interval",
                "learning_rate", "weight_decay"):
        need(cfg[key] >= 0, f"{key}={cfg[key]} must be >= 0")
    need(cfg["n_thoughts_eval"] >= -1, f"n_thoughts_eval={cfg['n_thoughts_eval']} must be >= 0, or -1 "
                                       f"(= max_latent_stage * c_thought)")
    need(0 <= cfg["uniform_prob"] <= 1, f"uniform_prob={cfg['uniform_prob']} must be in [0, 1]")
    need(0 <= cfg["dropout"] < 1, f"dropout={cfg['dropout']} must be in [0, 1)")
    need(cfg["n_embd"] % cfg["n_head"] == 0, f"n_embd={cfg['n_embd']} must be a multiple of n_head={cfg['n_head']}")
    if cfg["eval_only"]:
        need(cfg["init_from"] != "scratch", "eval_only=True with init_from='scratch' would score an untrained "
                                            "model: give --init_from=resume, a .pt checkpoint or a trained model")
    if cfg["thoughts_sweep"]:
        parse_counts(cfg["thoughts_sweep"])
        need(cfg["method"] in MARKER_METHODS, f"thoughts_sweep needs thoughts or pauses; method={cfg['method']!r} "
                                              f"has none (use one of {', '.join(MARKER_METHODS)})")
    # activation checkpointing drops the KV cache inside a checkpointed layer: the thought passes would stop
    # seeing the earlier positions (model.enable_activation_checkpointing; README "Beyond one GPU's memory")
    need(not (cfg["gradient_checkpointing"] and cfg["method"] == "coconut"),
         "gradient_checkpointing=True does not work with method=coconut: its thought passes carry a KV cache "
         "with gradients, which checkpointed layers drop; use --fsdp=True or a smaller micro_batch_size instead")
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
        raise UserError(f"thoughts_sweep={text!r}: give thought counts >= 0 separated by commas, e.g. 0,1,2,3")
    return counts

def check_init_from(init_from):
    """A .pt to start from must exist; any other file is not something to load."""
    if init_from.endswith(".pt") and not os.path.isfile(init_from):
        raise UserError(f"init_from={init_from!r}: no such checkpoint file")
    if not init_from.endswith(".pt") and init_from not in ("scratch", "resume") and os.path.isfile(init_from):
        raise UserError(f"init_from={init_from!r} is a file but not a .pt checkpoint: give a .pt file of "
                        f"coconut.py, a save_pretrained directory or a hub name")

# what a resumed run must share with its checkpoint (num_epochs, out_dir, eval settings may change)
RESUME_KEYS = ("arch", "n_layer", "n_head", "n_embd", "block_size", "dropout", "task", "task_options",
               "data_path", "split_layout", "n_train", "tokenizer", "seed", "method", "c_thought",
               "epochs_per_stage", "max_latent_stage", "start_stage", "pad_latent_to_max", "uniform_prob",
               "batch_size")

def check_checkpoint_kind(ckpt, path):
    """A checkpoint of latro.py (or anything else) is not a Coconut checkpoint: refuse it by name."""
    if ckpt.get("script", "coconut") != "coconut" or "method" not in ckpt.get("config", {}):
        raise UserError(f"{path} is not a coconut.py checkpoint (made by {ckpt.get('script', 'another script')}): "
                        f"give a checkpoint of coconut.py, or an HF model name or directory")

def resolve_tokenizer(name, base, ckpt=None):
    """The tokenizer follows the model unless set: '' -> a checkpoint's own, else the word vocabulary for a model
    from scratch, else the HF model's own (init_from, a hub name or a local directory: offline works)."""
    if name:
        return name
    if ckpt is not None:
        saved = ckpt.get("tokenizer") or ckpt.get("config", {}).get("tokenizer")
        if saved:
            return saved
    return "words" if base == "scratch" else base

# -----------------------------------------------------------------------------
# the training loop's decisions, as small functions the loop calls and the tests import

def draw_stages(rng, stage, uniform_prob, n_steps_list):
    """Each training example's stage this epoch: the scheduled `stage`, or with probability uniform_prob a random
    stage in 0..#steps of that example (released: uniform_prob=0). One rng.random() per example, then a randint
    for the drawn ones, in order: the same draws on every rank and on resume."""
    return [stage if rng.random() >= uniform_prob else rng.randint(0, n) for n in n_steps_list]

def epoch_order(seed, epoch, stage, uniform_prob, n_steps_list):
    """(stages, permutation) of an epoch, seeded by (seed, epoch) only: every rank and every resume draws the
    same, so a run resumed mid-epoch continues with the same batches."""
    rng = random.Random(seed + epoch)
    stages = draw_stages(rng, stage, uniform_prob, n_steps_list)
    return stages, rng.sample(range(len(n_steps_list)), len(n_steps_list))

def rank_block(batch, rank, micro, grad_accum, micro_batch_size):
    """This rank's examples at this micro-step: the global batch is cut into world x grad_accum blocks, rank r
    takes blocks r*grad_accum .. (r+1)*grad_accum-1, so 2 ranks x 1 micro-step == 1 process x 2 micro-steps."""
    at = (rank * grad_accum + micro) * micro_batch_size
    return batch[at:at + micro_batch_size]

def resets_optimizer(epoch, stage_at_epoch, mode):
    """Does epoch `epoch` start with a new AdamW? stage_at_epoch: the stage of each epoch (a list, or a function
    of the epoch). 'epoch': every epoch but the first; 'stage': when the stage changes; 'never'."""
    if epoch == 0 or mode == "never":
        return False
    at = stage_at_epoch if callable(stage_at_epoch) else stage_at_epoch.__getitem__
    return mode == "epoch" or at(epoch) != at(epoch - 1)

def step_seed(seed, iter_num, rank):
    """The torch seed of optimizer step iter_num on a rank (dropout): reseeding each step makes a resume at any
    step exact without saving every rank's RNG state."""
    return (seed * 1_000_003 + iter_num) * 1009 + rank

def longest_rows(encoded, stages_by_split, lay):
    """(length, split, index, stage) of the longest laid-out sequence: training rows at every stage they can be
    drawn at (prompt + target), evaluation prompts at their thoughts plus the tokens generated are added by
    the caller. stages_by_split: {split: function(example) -> stages}."""
    best = (0, None, None, None)  # (nothing to train: eval_only)
    for split, stages_of_ex in stages_by_split.items():
        for i, ex in enumerate(encoded[split]):
            for st in stages_of_ex(ex):
                p, t = layout(*ex, st, **lay)
                if len(p) + len(t) > best[0]:
                    best = (len(p) + len(t), split, i, st)
    return best

def max_positions(hf_config):
    """The positions a model can take (GPT-2: n_positions; Llama and most others: max_position_embeddings)."""
    return getattr(hf_config, "n_positions", None) or getattr(hf_config, "max_position_embeddings", None)

# -----------------------------------------------------------------------------
if __name__ == "__main__":
    # ---- every check that needs no data, then out_dir, then DDP (torchrun sets RANK): NCCL on CUDA, gloo on CPU
    ddp = int(os.environ.get("RANK", -1)) != -1
    ddp_rank, ddp_local_rank, ddp_world_size = (int(os.environ.get(k, d)) for k, d in
                                                (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    master_process = ddp_rank == 0
    log = print if master_process else (lambda *a, **k: None)
    grad_accum = check_config(config, ddp_world_size)                  # fails here, before any work
    check_init_from(init_from)
    if fsdp and not ddp:
        raise UserError("fsdp=True shards over the processes of a torchrun launch: start with "
                        "torchrun --nproc_per_node=N coconut.py ..., or drop --fsdp=True")
    resume = init_from == "resume"
    if master_process and not eval_only:  # create, write-probe and lock out_dir; no silent overwrite
        out_lock = prepare_out_dir(out_dir, resume=resume, overwrite=overwrite)
    elif os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir {out_dir!r} is a file, not a directory: choose another --out_dir")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if ddp:
        init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                           timeout=datetime.timedelta(seconds=ddp_timeout))
        if device.startswith("cuda"):
            device = f"cuda:{ddp_local_rank}"
            torch.cuda.set_device(device)
    log(f"global batch {batch_size} = {micro_batch_size} per micro-step x {grad_accum} accumulation x "
        f"{ddp_world_size} ranks" + (" (fsdp)" if fsdp else ""))
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    ctx = autocast_ctx(device_type, precision)                         # fp32 as released, or bf16 autocast

    # ---- data: examples -> token pieces (question, steps, answer + eos), identical on every rank; load_task
    # fills '{split}' (valid or val) and refuses one file for all splits unless split_layout cuts it
    splits = {s: load_task(task, s, path=data_path, n=n, seed=seed, split_layout=split_layout,
                           **ast.literal_eval(task_options))
              for s, n in (("train", n_train), ("val", n_val), ("test", n_test))}
    check_split_overlap(splits)                                        # no question in two splits
    steps_per_epoch = len(splits["train"]) // batch_size               # the last partial batch is dropped
    if steps_per_epoch == 0 and not eval_only:
        raise UserError(f"{len(splits['train'])} training examples < batch_size={batch_size}: lower batch_size "
                        f"or give more data (n_train)")

    # ---- the checkpoint to start from: of this script, and (resume) of this very run
    ckpt_path = os.path.join(out_dir, "ckpt.pt") if resume else init_from
    ckpt = None
    if resume or init_from.endswith(".pt"):
        try:
            ckpt = load_checkpoint(ckpt_path)
        except (FileNotFoundError, RuntimeError) as e:
            raise UserError(str(e)) from None
        check_checkpoint_kind(ckpt, ckpt_path)
        if resume:  # the checkpoint's values are the run's: a different one is refused, never silently kept
            check_same_run(ckpt["config"], config, RESUME_KEYS)
    base = ckpt["base"] if ckpt else init_from                         # 'scratch' or the HF model it started from
    if base != "scratch":  # the model's config.json: found (local or hub), before anything else is read
        try:
            base_cfg = AutoConfig.from_pretrained(base)
        except OSError as e:  # no such directory, and not on the hub (or offline without a cached copy)
            raise UserError(f"init_from={base!r}: no model there ({str(e).splitlines()[0]}); give a "
                            f"save_pretrained directory, a hub name, 'scratch' or a .pt checkpoint") from None
    tok_name = resolve_tokenizer(tokenizer, base, ckpt)                # the model's own unless set
    tok = build_tokenizer(tok_name, [ex for exs in splits.values() for ex in exs])
    encoded = {s: [encode_example(tok, ex) for ex in exs] for s, exs in splits.items()}
    log(f"tokenizer: {tok_name}" + ("" if tokenizer else " (the model's own)"))
    log(f"{task}: {', '.join(f'{s} {len(e)}' for s, e in splits.items())} examples, vocabulary {len(tok)}")

    # ---- the markers: only for the methods that use them, as released; a checkpoint of this script brings
    # its own (resume) or has none (the GSM8k CoT stage): then they are added and initialised now
    had_markers = markers_present(tok, ckpt)                           # trained rows are never overwritten
    new_markers = method in MARKER_METHODS and not had_markers
    source_id = marker_source(tok, marker_init, base) if new_markers else None  # fails here, before any work
    n_real = len(tok)                                                  # the vocabulary without the markers
    special = marker_ids(tok) if method in MARKER_METHODS or had_markers else (None, None, None)
    latent_id = special[1]

    # ---- the curriculum: stage per epoch, thoughts per stage
    curriculum = method in ("coconut", "no_thoughts", "pause_as_thought")
    final_stage = max_latent_stage + 1 if curriculum else 0
    stage_at = lambda ep: stage_of(ep, start_stage, epochs_per_stage, max_latent_stage) if curriculum else 0
    lay = dict(method=method, c_thought=c_thought, max_latent_stage=max_latent_stage, special=special,
               pad_latent_to_max=pad_latent_to_max, n_pause=max_latent_stage * c_thought)
    thoughts_at = lambda st: layout([], [[0]] * 99, [], st, **lay)[0].count(latent_id)  # (of a long example)
    feedback_id = latent_id if method == "coconut" else None           # pause_as_thought: <latent> stays a token
    for st in sorted({stage_at(ep) for ep in range(num_epochs)}):
        eps = [ep for ep in range(num_epochs) if stage_at(ep) == st]
        replaced = "all" if st > max_latent_stage else st
        log(f"schedule: epochs {eps[0]}-{eps[-1]} {method} stage {st}: {thoughts_at(st)} thoughts/pauses, "
            f"{replaced if curriculum else 'no'} steps replaced")
    if final_stage not in {stage_at(ep) for ep in range(num_epochs)} and not eval_only:
        log(f"note: no epoch reaches the final stage {final_stage}, so no best.pt: the last weights are tested")

    # ---- the model's shape (no weights yet): its positions against the longest sequence, and the memory plan
    mcfg = ckpt["config"] if ckpt else config                          # a checkpoint brings its own model shape
    if ckpt and not resume:
        log(f"model shape from {ckpt_path}: arch {mcfg['arch']}, {mcfg['n_layer']} layers, {mcfg['n_head']} heads, "
            f"n_embd {mcfg['n_embd']}, block_size {mcfg['block_size']} (the config's values do not apply)")
    n_rows = len(tok) if had_markers or not ckpt else n_real           # a checkpoint's own row count first
    shape_kw = dict(arch=mcfg["arch"], n_layer=mcfg["n_layer"], n_head=mcfg["n_head"], n_embd=mcfg["n_embd"],
                    block_size=mcfg["block_size"], dropout=mcfg["dropout"], bos_id=tok.bos_id, eos_id=tok.eos_id,
                    pad_id=tok.pad_id, device_type=device_type)
    with torch.device("meta"):  # the shape only: no memory used, no weights read
        if base == "scratch":
            shape_model = load_model("scratch", n_rows, **shape_kw)
        else:
            shape_model = AutoModelForCausalLM.from_config(base_cfg)
    hf_cfg, n_params = shape_model.config, sum(p.numel() for p in shape_model.parameters())
    shape_model = None
    stages_run = set() if eval_only else {stage_at(ep) for ep in range(num_epochs)}
    # a training row at every stage it can meet: the scheduled ones, and any of 0..#steps with uniform_prob
    drawn = lambda ex: stages_run | (set(range(len(ex[1]) + 1)) if uniform_prob > 0 and stages_run else set())
    train_len, _, idx, st_ = longest_rows(encoded, {"train": drawn}, lay)
    n_eval = [n_thoughts_eval if n_thoughts_eval >= 0 else None] + (
        parse_counts(thoughts_sweep) if thoughts_sweep else [])
    eval_prompts = [(len(layout(q, s, [], final_stage, **lay, n_thoughts=n, inference=True)[0]), "test", n)
                    for q, s, _ in encoded["test"] for n in n_eval]
    eval_prompts += [(len(layout(q, s, [], st, **lay, inference=True)[0]), "val", st)
                     for q, s, _ in encoded["val"] for st in stages_run]
    eval_len = max([p for p, _, _ in eval_prompts] or [0]) + max_new_tokens
    positions = max_positions(hf_cfg)
    if positions and train_len > positions:
        raise UserError(f"training example {idx} is {train_len} tokens at stage {st_}, more than the model's "
                        f"{positions} positions (block_size): raise --block_size (scratch), lower "
                        f"max_latent_stage or c_thought, or drop long examples")
    if positions and eval_len > positions:
        raise UserError(f"the longest evaluation prompt + max_new_tokens={max_new_tokens} is {eval_len} tokens, "
                        f"more than the model's {positions} positions: lower --max_new_tokens or raise block_size")
    unit = 2 if precision == "bf16" else 4
    plan = memory_plan(n_params, mode="fsdp" if fsdp else "ddp", world_size=ddp_world_size, precision=precision,
                       grad_accum=grad_accum if fsdp else 1,
                       kv_cache_bytes=estimate_kv_cache_bytes(hf_cfg, eval_batch_size, eval_len, unit),
                       activations_bytes=estimate_activation_bytes(
                           hf_cfg, micro_batch_size * train_len, logit_positions=micro_batch_size * train_len,
                           checkpointing=gradient_checkpointing, dtype_bytes=unit),
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
        src = "fresh random rows" if source_id is None else f"copies of {tok.decode([source_id])!r}"
        log(f"markers: added, ids {list(special)}, {src}")
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    log(f"model: {base} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    coconut_model = Coconut(model, feedback_id)
    if fsdp:  # each decoder layer and the root sharded; the model moves to the device a unit at a time
        train_model = fsdp_wrap(coconut_model, device_type, bf16=precision == "bf16" and device_type == "cuda")
    else:
        model.to(device)
        train_model = coconut_model
        if ddp:
            train_model = DDP(train_model, device_ids=[ddp_local_rank] if device_type == "cuda" else None)
    new_optimizer = lambda: torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    optimizer = new_optimizer()                                        # AdamW as released: no schedule, no clipping
    start_epoch, start_step, iter_num, best_val = 0, 0, 0, -1.0
    if resume:
        if fsdp:
            load_full_state_dicts(model, optimizer, ckpt["model"], ckpt["optimizer"])
        else:
            optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, iter_num, best_val = ckpt["epoch"], ckpt["iter_num"], ckpt["best_val_acc"]
        start_step = ckpt.get("step_in_epoch", 0)
        for group in optimizer.param_groups:  # the loaded state brings the old lr; this run's lr is the log's
            group.update(lr=learning_rate, weight_decay=weight_decay)
        log(f"resumed from {ckpt_path}: epoch {start_epoch}, step {start_step} of the epoch, step {iter_num}")
    ckpt = None                                                        # (free the checkpoint's tensors)
    if wandb_log and master_process:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)

    def model_state():
        """The model's state dict, gathered whole under FSDP (a collective: every rank calls it)."""
        return gather_full(model.state_dict()) if fsdp else model.state_dict()

    def save(name, obj, model_sd):
        """Write out_dir/name from rank 0, never with non-finite weights (every rank checks the same values, so
        every rank stops together)."""
        bad = nonfinite_names(model_sd.items())
        if bad:
            raise UserError(f"non-finite weights ({', '.join(bad[:3])}) after step {iter_num}: {name} not written, "
                            f"the last one kept; lower --learning_rate")
        if master_process:
            save_checkpoint(os.path.join(out_dir, name), {**obj, "model": model_sd})

    def save_ckpt(next_epoch, step_in_epoch):
        """ckpt.pt: where to continue (the epoch, the steps done in it) and everything to continue exactly."""
        model_sd, optim_sd = (model_state(), gather_full(optimizer.state_dict())) if fsdp else \
            (model.state_dict(), optimizer.state_dict())
        save("ckpt.pt", {"optimizer": optim_sd, "config": config, "script": "coconut", "base": base,
                         "tokenizer": tok_name, "markers": latent_id is not None, "epoch": next_epoch,
                         "step_in_epoch": step_in_epoch, "stage": stage_at(next_epoch), "iter_num": iter_num,
                         "best_val_acc": best_val}, model_sd)

    def finish_ddp():
        if ddp:  # free the DDP wrapper first: it holds the process group, and a group torn down only at
            global train_model  # interpreter exit (its gloo threads still holding tensors) aborts the process
            del train_model
            gc.collect()
            torch.distributed.barrier()
            destroy_process_group()

    def run_eval(split, stage, n_thoughts=None):
        """Greedy accuracy and mean tokens (thoughts included) on a split. Rank r takes examples r, r+W, ... so
        each is counted exactly once (no sampler padding), then the sums are all-reduced."""
        mine = slice(ddp_rank, None, ddp_world_size)
        prompts = [layout(q, s, [], stage, **lay, n_thoughts=n_thoughts, inference=True)[0]
                   for q, s, _ in encoded[split][mine]]
        golds = [ex["answer"] for ex in splits[split][mine]]
        model.eval()
        with ctx, gathered(train_model):  # FSDP: weights gathered once; ranks may then run different counts
            c, n, texts = evaluate_rank(model, prompts, golds, tok, feedback_id, eval_batch_size, max_new_tokens, device)
        model.train()
        sums = torch.tensor([c, n], dtype=torch.float64, device=device)
        if ddp:
            all_reduce(sums)
        return sums[0].item() / len(encoded[split]), sums[1].item() / len(encoded[split]), prompts, texts

    @torch.no_grad()
    def run_val_loss(stage):
        """Mean next-token loss per labelled token on the val split at the epoch's training layout (the released
        code prints it each epoch); rank r takes examples r, r+W, ..., the sums are all-reduced."""
        total, count = 0.0, 0
        mine = encoded["val"][ddp_rank::ddp_world_size]
        model.eval()
        with gathered(train_model):
            for i in range(0, len(mine), eval_batch_size):
                rows = [layout(*ex, stage, **lay) for ex in mine[i:i + eval_batch_size]]
                ids, mask, labels = (t.to(device) for t in collate(rows, [anchor(p, latent_id) for p, _ in rows],
                                                                    tok.pad_id))
                n = (labels[:, 1:] != -100).sum().item()
                with ctx:
                    total += coconut_model(ids, mask, labels).item() * n  # the mean over this batch's n tokens
                count += n
        model.train()
        sums = torch.tensor([total, count], dtype=torch.float64, device=device)
        if ddp:
            all_reduce(sums)
        return sums[0].item() / max(sums[1].item(), 1)

    def aligned_columns(rows, anchors):
        """FSDP: every pass all-gathers each layer, so every rank must run the same passes even when its rows
        hold fewer thoughts. All-reduce (max) the anchor column, the length after it and the thought count: all
        ranks then lay out their micro-batch alike and split at the same columns (c0, width, cols)."""
        n = max(p.count(feedback_id) for p, _ in rows) if feedback_id is not None else 0
        after = max(len(p) + len(t) - a for (p, t), a in zip(rows, anchors))
        t = torch.tensor([max(anchors), after, n], device=device)
        all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        c0, after, n = t.tolist()
        return c0, c0 + after, list(range(c0, c0 + n))

    def grad_norm():
        """The global gradient norm (after the sync: the same on every rank; gathered under FSDP)."""
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # ---- training: each epoch has one stage; every rank draws the same global batches and takes its block
    model.train()
    stop = StopRequest()                                               # Ctrl-C / SIGTERM: save at the next step
    n_steps_list = [len(s) for _, s, _ in encoded["train"]]
    for epoch in range(start_epoch, start_epoch if eval_only else num_epochs):
        stage = stage_at(epoch)
        first = start_step if epoch == start_epoch else 0              # a resumed epoch continues where it was
        if first == 0 and resets_optimizer(epoch, stage_at, reset_optimizer):
            optimizer = new_optimizer()                                # the new sequences deserve fresh moments
        stages, perm = epoch_order(seed, epoch, stage, uniform_prob, n_steps_list)  # same on every rank
        for step in range(first, steps_per_epoch):
            torch.manual_seed(step_seed(seed, iter_num, ddp_rank))     # dropout: resuming at any step is exact
            t0, loss_sum, n_tok = time.time(), 0.0, 0
            batch = perm[step * batch_size:(step + 1) * batch_size]
            for micro in range(grad_accum):
                rows = [layout(*encoded["train"][i], stages[i], **lay)
                        for i in rank_block(batch, ddp_rank, micro, grad_accum, micro_batch_size)]
                anchors = [anchor(p, latent_id) for p, _ in rows]      # first thoughts line up in one column
                c0, width, cols = aligned_columns(rows, anchors) if fsdp else (None, None, None)
                input_ids, mask, labels = (t.to(device) for t in collate(rows, anchors, tok.pad_id, c0, width))
                set_grad_sync(train_model, micro == grad_accum - 1)    # all-reduce on the last micro-step only
                with ctx:
                    loss = train_model(input_ids, mask, labels, cols) / grad_accum
                loss.backward()
                loss_sum, n_tok = loss_sum + loss.item(), n_tok + mask.sum().item()
            if ddp:  # log the global batch's loss, not rank 0's share (gloo has no AVG: sum, then divide)
                stats = torch.tensor([loss_sum, n_tok], dtype=torch.float64, device=device)
                all_reduce(stats)
                loss_sum, n_tok = stats[0].item() / ddp_world_size, stats[1].item()
            gnorm = grad_norm()
            if not (math.isfinite(loss_sum) and math.isfinite(gnorm)):  # the same values on every rank
                raise UserError(f"step {iter_num + 1}: loss {loss_sum} and gradient norm {gnorm}: training "
                                f"diverged; stopped before the update, {out_dir}/ckpt.pt keeps the last good "
                                f"weights; lower --learning_rate")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            dt = time.time() - t0
            log(f"step {iter_num}/{steps_per_epoch * num_epochs} | epoch {epoch} stage {stage} thoughts "
                f"{thoughts_at(stage)} | loss {loss_sum:.4f} | lr {learning_rate:.1e} | dt {dt * 1000:.0f}ms | "
                f"tok/s {n_tok / dt:.0f}")
            if wandb_log and master_process:
                wandb.log({"loss": loss_sum, "stage": stage, "epoch": epoch, "grad_norm": gnorm}, step=iter_num)
            stopping = stop.requested(device)                          # every rank agrees (all-reduced)
            if stopping or (ckpt_interval and iter_num % ckpt_interval == 0):
                save_ckpt(epoch, step + 1)
            if stopping:
                log(f"stopped by a signal after step {iter_num}: {out_dir}/ckpt.pt saved; continue with "
                    f"--init_from=resume")
                finish_ddp()
                sys.exit(0)

        # ---- end of epoch: validation with this stage's layout, then checkpoints from rank 0
        val_loss = run_val_loss(stage)
        val_acc, val_tok, _, _ = run_eval("val", stage)
        log(f"epoch {epoch} stage {stage} | val loss {val_loss:.4f} | val acc {val_acc:.4f} | tokens {val_tok:.1f}")
        if wandb_log and master_process:
            wandb.log({"val_loss": val_loss, "val_acc": val_acc, "val_tokens": val_tok}, step=iter_num)
        # model selection only where every step is latent (stage > max_latent_stage for curriculum methods): at
        # the last stage with steps, long examples still reason in words and the model is not yet a Coconut model
        if stage >= final_stage and val_acc > best_val:
            best_val = val_acc
            save("best.pt", {"config": config, "script": "coconut", "base": base, "tokenizer": tok_name,
                             "markers": latent_id is not None, "epoch": epoch, "stage": stage, "val_acc": val_acc},
                 model_state())
        save_ckpt(epoch + 1, 0)

    if ddp and not fsdp:  # a cheap guard: DDP must leave every rank with the same weights (min == max of sums)
        sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
        lo, hi = sums.clone(), sums.clone()
        all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        log(f"ddp: parameters identical on {ddp_world_size} ranks: {bool((lo == hi).all())}")
    stop.restore()

    # ---- final: best-by-val weights (else the last), HF export for pretrained models, test accuracy, probe
    if not eval_only and best_val >= 0:  # (never a stale best.pt of an earlier run)
        if ddp:
            torch.distributed.barrier()                                # rank 0 has written it
        best_sd = load_checkpoint(os.path.join(out_dir, "best.pt"), map_location=device)["model"]
        if fsdp:
            load_full_state_dicts(model, None, best_sd)
        else:
            model.load_state_dict(best_sd)
        best_sd = None
    if base != "scratch" and not eval_only:
        export_sd = model_state()
        if master_process:
            save_pretrained_full(model, export_sd, os.path.join(out_dir, "hf"))
            tok.save_pretrained(os.path.join(out_dir, "hf"))
        export_sd = None
    test_acc, test_tok, prompts, texts = run_eval("test", final_stage, n_thoughts_eval if n_thoughts_eval >= 0 else None)
    log(f"test acc {test_acc:.4f} | tokens generated {test_tok:.1f} (thoughts included) | {len(encoded['test'])} examples")
    if wandb_log and master_process:
        wandb.log({"test_acc": test_acc, "test_tokens": test_tok})

    # ---- the paper's analysis: the same model tested with other numbers of thoughts, no retraining
    if thoughts_sweep:
        sweep = []
        for n in parse_counts(thoughts_sweep):
            acc, ntok, _, _ = run_eval("test", final_stage, n)
            sweep.append({"thoughts": n, "accuracy": acc, "tokens": ntok})
        log("| thoughts | test acc | tokens generated (thoughts included) |\n|---|---|---|")
        for r in sweep:
            log(f"| {r['thoughts']} | {r['accuracy']:.4f} | {r['tokens']:.1f} |")
        if master_process:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "thoughts_sweep.json"), "w") as f:
                json.dump({"init_from": init_from, "method": method, "examples": len(encoded["test"]),
                           "rows": sweep}, f, indent=1)
    # FSDP: every rank probes its own prompts inside gathered() (a collective); rank 0 prints
    n_probe = probe if master_process or fsdp else 0
    with gathered(train_model):
        for p, text in list(zip(prompts, texts))[:n_probe]:
            log(f"--- {tok.decode(p, skip_special_tokens=False)!r} -> {text!r}")
            if feedback_id in p:  # what each continuous thought encodes, read through the LM head
                probs, ids = probe_thoughts(model, p, latent_id, probe_topk, device)
                for j, (pr, ix) in enumerate(zip(probs.tolist(), ids.tolist())):
                    log(f"    thought {j + 1}: " + "  ".join(f"{tok.decode([i], skip_special_tokens=False)!r} "
                                                            f"{q:.2f}" for i, q in zip(ix, pr)))
    finish_ddp()
