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
max_latent_stage every step is gone. Read first: docs/walkthrough.md (every piece at the prompt).

Launch:
    python coconut.py                                  # CPU demo: two-hop questions, tiny GPT-2
    python coconut.py config/coconut_prosqa.py         # 1 GPU (batch 128 by accumulation)
    torchrun --standalone --nproc_per_node=8 coconut.py config/coconut_gsm8k.py  # 8 GPUs
Baselines (--method=), the thought sweep, every option: docs/coconut.md; nodes: docs/scaling.md.
"""

import ast
import dataclasses
import random
import sys
import time

import torch
import torch.nn as nn
from transformers import DynamicCache

import configurator
import data
import metrics
import parallel
import preflight
import vocab
from configurator import UserError
from model import (autocast_ctx, copy_token_rows, decode, hidden_states, left_pad, lm_head,
                   load_model, model_config, position_ids_from_mask, scratch_config, token_logprobs)
from parallel import print0
from run import Run

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
# what each key may hold, checked before any work (the rules that tie keys: check_config)
CHOICES = {"task": data.TASKS, "method": METHODS, "reset_optimizer": ("stage", "epoch", "never"),
           "precision": ("fp32", "bf16"), "arch": ("gpt2", "llama")}
BOUNDS = {"c_thought epochs_per_stage batch_size micro_batch_size eval_batch_size max_new_tokens "
          "probe_topk n_layer n_head n_embd block_size ddp_timeout learning_rate": "> 0",
          "n_train n_val n_test max_latent_stage start_stage probe ckpt_interval "
          "weight_decay": ">= 0", "n_thoughts_eval": ">= -1", "uniform_prob": "[0, 1]",
          "dropout": "[0, 1)"}

# -----------------------------------------------------------------------------
# the curriculum: which tokens an example is at stage k, and what is learned

@dataclasses.dataclass
class Curriculum:
    """What decides an example's tokens at a stage, and the stage of each epoch."""
    method: str              # one of METHODS
    c_thought: int           # thoughts per replaced step
    max_latent_stage: int    # the last stage with language steps left
    pad_latent_to_max: bool  # the released rule for examples with fewer steps than the stage
    special: tuple           # (<bot>, <latent>, <eot>) ids, or Nones for the methods without them
    start_stage: int = 0     # the stage of epoch 0
    epochs_per_stage: int = 1

    def stage(self, epoch):
        """The scheduled stage of an epoch (0 for the methods without a curriculum); the stages
        past max_latent_stage are all the same, so it stops at max_latent_stage + 1."""
        if self.method not in CURRICULUM_METHODS:
            return 0
        return min(self.start_stage + epoch // self.epochs_per_stage, self.max_latent_stage + 1)

    def stages(self, num_epochs):
        """The stages a run of num_epochs epochs trains at (each stage lasts whole epochs)."""
        return list(range(self.stage(0), self.stage(num_epochs - 1) + 1))

    @property
    def final_stage(self):
        """Where every step is latent (0 for the methods without a curriculum)."""
        return self.max_latent_stage + 1 if self.method in CURRICULUM_METHODS else 0

    def thoughts(self, stage):
        """The thoughts (or pauses) layout() gives at `stage` to an example with more steps than
        any stage replaces: what the schedule and the step log report."""
        if self.method == "pause":
            return self.max_latent_stage * self.c_thought
        if self.method in ("coconut", "pause_as_thought"):
            return min(stage, self.max_latent_stage) * self.c_thought
        return 0

def layout(q, steps, answer, stage, cur, n_thoughts=None, inference=False):
    """One example at curriculum `stage` as (prompt, target) token lists; the loss is on target
    only. q, answer: token ids (answer ends with eos); steps: list of token-id lists. n_thoughts
    overrides the stage's thought count; inference=True builds the prompt as the released
    evaluation does (it matters only for pad_latent_to_max=False)."""
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
    # pad_latent_to_max=False, as released: k is capped by the step count only past the last stage
    # and at inference (a training stage k gives k*c thoughts even to a shorter example)
    if not cur.pad_latent_to_max and (inference or stage > cur.max_latent_stage):
        k = min(k, len(steps))
    n = k * cur.c_thought if n_thoughts is None else n_thoughts
    return q + [bot] + [latent] * n + [eot], sum(kept, []) + answer

def epoch_order(seed, epoch, stage, uniform_prob, n_steps_list):
    """(stages, permutation) of an epoch, seeded by (seed, epoch) only: every rank and every resume
    draws the same, so a run resumed mid-epoch continues with the same batches. Each example's
    stage is the scheduled `stage`, or with probability uniform_prob a random stage in 0..#steps of
    that example (released: uniform_prob=0): one rng.random() per example, a randint for the drawn
    ones, in order."""
    rng = random.Random(seed + epoch)
    stages = [stage if rng.random() >= uniform_prob else rng.randint(0, n) for n in n_steps_list]
    return stages, rng.sample(range(len(n_steps_list)), len(n_steps_list))

def resets_optimizer(epoch, cur, mode):
    """Does epoch `epoch` start with a new AdamW? 'epoch': every epoch but the first; 'stage': when
    the stage changes (cur.stage); 'never'."""
    if epoch == 0 or mode == "never":
        return False
    return mode == "epoch" or cur.stage(epoch) != cur.stage(epoch - 1)

def collate(rows, latent_id, pad_id, c0=None, width=None):
    """rows: list of (prompt, target). Left-pad so every row's first thought (the end of a prompt
    without one) sits in the same column c0: thought j of every row is then column c0+j, and one
    tensor op per pass feeds the whole batch. Right-pad the rest. c0, width: at least this anchor
    column and this many columns (FSDP). Returns input_ids, attention_mask, labels (B, T)."""
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
    longer prefixes; latent_forward computes the same with each position encoded once (the tests
    hold them equal, bench.py times both). Returns (last hidden states (B, T, C), embeddings)."""
    embeds = model.get_input_embeddings()(input_ids)                   # (B, T, C)
    pos = position_ids_from_mask(attention_mask)
    for c in (input_ids == latent_id).any(0).nonzero().flatten().tolist():  # thought columns
        # h_{c-1}: the last hidden state of the prefix, the thoughts before column c included
        h = hidden_states(model, embeds[:, :c], attention_mask[:, :c], pos[:, :c])[:, -1]  # (B, C)
        # e_c = h_{c-1} in the rows with a thought in column c; the other rows keep their token
        is_thought = (input_ids[:, c] == latent_id)[:, None]
        fed = torch.where(is_thought, h, embeds[:, c])
        embeds = torch.cat([embeds[:, :c], fed[:, None], embeds[:, c + 1:]], dim=1)
    return hidden_states(model, embeds, attention_mask, pos), embeds

def latent_forward(model, input_ids, attention_mask, latent_id, cols=None):
    """naive_latent_forward with each position encoded once: the columns that hold a thought in any
    row split the sequence into passes, and a DynamicCache keeps every earlier position's keys and
    values; gradients flow through every thought and the cache. latent_id=None: one plain pass.
    cols (FSDP only): the columns to split at, the same on every rank (a split at a token column
    changes nothing). Returns (last hidden states (B, T, C), cache)."""
    embeds = model.get_input_embeddings()(input_ids)                   # (B, T, C)
    # left padding: each row's positions start at its first real token
    pos = position_ids_from_mask(attention_mask)
    is_latent = torch.zeros_like(input_ids, dtype=torch.bool)          # (B, T)
    if latent_id is not None:
        is_latent = input_ids == latent_id
    if cols is None:  # the thought columns (one device sync per forward)
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
        hs.append(hidden_states(model, x, attention_mask[:, :e], pos[:, s:e], cache=cache))
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
# inference: the latent prefix with the cache, then KV-cached greedy decoding; what a thought holds

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

def eval_prompts(rows, stage, cur, n_thoughts=None):
    """The prompts (question + markers + thoughts, as the released evaluation lays them out) of
    encoded examples at `stage`; n_thoughts overrides the stage's thought count."""
    return [layout(q, steps, [], stage, cur, n_thoughts=n_thoughts, inference=True)[0]
            for q, steps, _ in rows]

# -----------------------------------------------------------------------------
# the rules that tie keys together (each key's own CHOICES and BOUNDS are checked first)

def check_config(c, world_size):
    """Called before any work with c.key = each key's value: the first rule broken is the error."""
    if c.thoughts_sweep and c.method not in MARKER_METHODS:
        raise UserError(f"thoughts_sweep needs thoughts or pauses; method={c.method!r} has none "
                        f"(use one of {', '.join(MARKER_METHODS)})")
    # checkpointed layers drop the KV cache that carries the thought passes (with gradients)
    if c.gradient_checkpointing and c.method == "coconut":
        raise UserError("gradient_checkpointing=True does not work with method=coconut: its "
                        "thought passes carry a KV cache with gradients, which checkpointed layers "
                        "drop; use --fsdp=True or a smaller micro_batch_size instead")
    # the global batch is cut into whole micro-batches, the same number on every rank
    if c.batch_size % (c.micro_batch_size * world_size):
        raise UserError(f"batch_size={c.batch_size} (global) must be a multiple of "
                        f"micro_batch_size={c.micro_batch_size} x {world_size} ranks = "
                        f"{c.micro_batch_size * world_size}: change batch_size, micro_batch_size "
                        f"or the number of processes")

# -----------------------------------------------------------------------------
if __name__ == "__main__":
    config = configurator.configure(globals(), sys.argv[1:], choices=CHOICES, bounds=BOUNDS,
                                    check=check_config, own_checkpoints=True,
                                    renamed=configurator.RENAMED)
    # ---- processes, device, out_dir; the checkpoint to start from (resume, or e.g. the CoT stage)
    run = Run("coconut", config, writes=not eval_only, results=bool(thoughts_sweep))
    device, ddp_rank, ddp_world_size = run.device, run.rank, run.world_size
    grad_accum = batch_size // (micro_batch_size * ddp_world_size)
    print0(f"global batch {batch_size} = {micro_batch_size} per micro-step x {grad_accum} "
           f"accumulation x {ddp_world_size} ranks{' (fsdp)' if fsdp else ''}")
    ctx = autocast_ctx(torch.device(device).type, precision)          # fp32 as released, or bf16

    # ---- data: every split, identical on every rank, no question in two splits
    splits = data.load_splits(task, (n_train, n_val, n_test), path=data_path, seed=seed,
                              split_layout=split_layout, allow_overlap=allow_split_overlap,
                              batch_size=0 if eval_only else batch_size,
                              **ast.literal_eval(task_options))
    data.check_coconut_answers(splits)                                 # the '#' scoring rule
    steps_per_epoch = len(splits["train"]) // batch_size               # the last partial batch: no

    # ---- tokens: the tokenizer, the examples as (question, steps, answer) ids, the three markers
    ckpt = run.ckpt or {}
    base = ckpt.get("base", init_from)                                 # 'scratch' or an HF model
    base_cfg = model_config(base) if base != "scratch" else None       # a wrong name fails here
    tok_name = vocab.tokenizer_name(tokenizer, base, ckpt.get("tokenizer", ""))
    tok = vocab.build_tokenizer(tok_name, [ex for exs in splits.values() for ex in exs],
                                saved_words=ckpt.get("vocab"))         # a checkpoint's own words
    encoded = {s: [vocab.encode_example(tok, ex) for ex in exs] for s, exs in splits.items()}
    sizes = ", ".join(f"{s} {len(e)}" for s, e in splits.items())
    print0(f"tokenizer: {tok_name}" + ("" if tokenizer else " (the model's own)"))
    print0(f"{task}: {sizes} examples, vocabulary {len(tok)}")
    vocab.check_no_special_text(tok, splits)                           # e.g. '</s>' in a question
    run.agree("data", {"sizes": list(map(len, encoded.values())), "vocabulary": len(tok)})
    markers = vocab.coconut_markers(tok, method in MARKER_METHODS, run.ckpt, marker_init, base)
    latent_id = markers.ids[1]                                         # (<bot>, <latent>, <eot>)
    feedback_id = latent_id if method == "coconut" else None           # pause_as_thought: a token

    # ---- the curriculum: the stage of each epoch; where model selection starts
    cur = Curriculum(method=method, c_thought=c_thought, max_latent_stage=max_latent_stage,
                     pad_latent_to_max=pad_latent_to_max, special=markers.ids,
                     start_stage=start_stage, epochs_per_stage=epochs_per_stage)
    print0(preflight.schedule_lines(cur, num_epochs, note=not eval_only))
    n_test_thoughts = n_thoughts_eval if n_thoughts_eval >= 0 else None  # None: the final stage's
    sweep_counts = configurator.counts(thoughts_sweep) or []

    # ---- the model's shape (no weights yet): positions against the longest sequences, memory plan
    shape_kw = {**run.shape, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
    hf_cfg = base_cfg if base != "scratch" else scratch_config(markers.n_rows, **shape_kw)
    longest = preflight.coconut_longest(encoded, cur, layout=layout, eval_prompts=eval_prompts,
                                        stages=[] if eval_only else cur.stages(num_epochs),
                                        uniform_prob=uniform_prob, max_new_tokens=max_new_tokens,
                                        test_counts=[n_test_thoughts] + sweep_counts)
    train_len, eval_len = longest[0][0], longest[1][0]
    preflight.preflight(hf_cfg, device, longest=longest, fsdp=fsdp, precision=precision,
                        grad_accum=grad_accum, kv_cache=(eval_batch_size, eval_len),
                        activations=(micro_batch_size * train_len, micro_batch_size * train_len,
                                     gradient_checkpointing),
                        out_dir=None if eval_only else out_dir, training=not eval_only,
                        extra_weights=num_epochs if keep_epoch_checkpoints else 0)

    # ---- model: scratch, an HF model, a checkpoint of this script (e.g. the CoT stage), or resume
    torch.manual_seed(seed)
    model = load_model(base, markers.n_rows, device_type=torch.device(device).type,
                       checkpointing=gradient_checkpointing, **shape_kw)
    if run.ckpt:
        run.restore(model)                                             # its weights
    if markers.new:                                                    # as released
        copy_token_rows(model, len(tok), markers.ids, markers.source_id)
        print0(f"markers: added, ids {list(markers.ids)}, {markers.describe(tok)}")
    print0(f"model: {base} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    # one forward holds every thought pass (DDP: one forward per backward); FSDP shards each decoder
    # layer and the root. AdamW as released: no schedule, no clipping
    bf16 = precision == "bf16"
    train_model = parallel.distribute(Coconut(model, feedback_id), device, fsdp, bf16=bf16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    start_epoch, start_step, iter_num = map(run.resumed, ("epoch", "step_in_epoch", "iter_num"))
    if run.resuming:                                                   # and AdamW's moments
        run.restore(model, optimizer)
        print0(f"resumed from {run.ckpt_path}: epoch {start_epoch}, step {start_step} of the "
               f"epoch, step {iter_num}")
    run.info.update(base=base, tokenizer=tok_name, markers=latent_id is not None,
                    vocab=tok.word_list())
    mine = slice(ddp_rank, None, ddp_world_size)                       # this rank's eval examples
    golds = {s: [ex["answer"] for ex in splits[s][mine]] for s in ("val", "test")}
    dec = metrics.Decoding(tok=tok, latent_id=feedback_id, batch_size=eval_batch_size,
                           max_new_tokens=max_new_tokens, ctx=ctx, device=device,
                           progress=progress, generate=generate_answers)

    # ---- training: an epoch has one stage; each rank takes its block of the same global batches
    model.train()
    for epoch in range(start_epoch, 0 if eval_only else num_epochs):
        stage = cur.stage(epoch)
        first = start_step if epoch == start_epoch else 0              # a resumed epoch continues
        # the new stage's sequences deserve fresh moments (reset_optimizer)
        if first == 0 and resets_optimizer(epoch, cur, reset_optimizer):
            optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate,
                                          weight_decay=weight_decay)
        # seeded by (seed, epoch) only: the same on every rank, and on resume
        stages, perm = epoch_order(seed, epoch, stage, uniform_prob,
                                   [len(steps) for _, steps, _ in encoded["train"]])
        for step in range(first, steps_per_epoch):
            # dropout reseeded every step from (seed, step, rank): resuming at any step is exact
            torch.manual_seed((seed * 1_000_003 + iter_num) * 1009 + ddp_rank)
            t0 = time.time()
            loss_sum, n_tok = 0.0, 0
            batch = perm[step * batch_size:(step + 1) * batch_size]
            # forward and backward on this rank's block of each micro-step: gradient accumulation
            for micro in range(grad_accum):
                block = parallel.rank_block(batch, ddp_rank, micro, grad_accum, micro_batch_size)
                rows = [layout(*encoded["train"][i], stages[i], cur) for i in block]
                # the first thoughts of every row line up in one column: one pass per thought column
                # (FSDP: the same columns on every rank, so that every rank runs the same passes)
                c0, width, cols = parallel.aligned_columns(rows, latent_id, feedback_id, device,
                                                           fsdp)
                input_ids, mask, labels = (t.to(device) for t in
                                           collate(rows, latent_id, tok.pad_id, c0, width))
                # the gradients are all-reduced on the last micro-step only
                parallel.set_grad_sync(train_model, micro == grad_accum - 1)
                with ctx:
                    loss = train_model(input_ids, mask, labels, cols) / grad_accum
                loss.backward()
                loss_sum += loss.item()
                n_tok += mask.sum().item()
            # log the global batch's loss, not rank 0's share (gloo has no AVG: sum, then divide)
            stats = parallel.all_sum(torch.tensor([loss_sum, n_tok], dtype=torch.float64), device)
            loss_sum, n_tok = stats[0].item() / ddp_world_size, stats[1].item()
            # a diverged step stops before the update; the values are the same on every rank
            gnorm = run.require_finite(f"step {iter_num + 1}", loss_sum, model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            dt = time.time() - t0
            print0(f"step {iter_num}/{steps_per_epoch * num_epochs} | epoch {epoch} stage {stage} "
                   f"thoughts {cur.thoughts(stage)} | loss {loss_sum:.4f} | "
                   f"lr {learning_rate:.1e} | dt {dt * 1000:.0f}ms | tok/s {n_tok / dt:.0f}")
            run.log({"loss": loss_sum, "epoch": epoch, "stage": stage, "grad_norm": gnorm},
                    step=iter_num)
            # ckpt.pt every ckpt_interval steps; on Ctrl-C / SIGTERM (any rank): ckpt.pt, then exit
            due = ckpt_interval > 0 and iter_num % ckpt_interval == 0
            run.after_step(model, optimizer, f"after step {iter_num}", save=due, epoch=epoch,
                           step_in_epoch=step + 1, stage=stage, iter_num=iter_num)

        # ---- end of epoch: validation at this stage's layout, then the checkpoints from rank 0
        val_rows = [layout(*ex, stage, cur) for ex in encoded["val"][mine]]
        val_loss = metrics.validation_loss(train_model, [
            collate(val_rows[i:i + eval_batch_size], latent_id, tok.pad_id)
            for i in range(0, len(val_rows), eval_batch_size)], dec)
        prompts = eval_prompts(encoded["val"][mine], stage, cur)
        val_acc, val_tok, _ = metrics.greedy_accuracy(model, train_model, prompts, golds["val"],
                                                      dec)
        print0(f"epoch {epoch} stage {stage} | val loss {val_loss:.4f} | val acc {val_acc:.4f} | "
               f"tokens {val_tok:.1f}")
        run.log({"val_loss": val_loss, "val_acc": val_acc, "val_tokens": val_tok, "epoch": epoch,
                 "stage": stage}, step=iter_num)
        done = dict(epoch=epoch, stage=stage, val_acc=val_acc, iter_num=iter_num)
        # model selection only where every step is latent (stage > max_latent_stage for curriculum
        # methods): at the last stage with steps, long examples still reason in words
        if stage >= cur.final_stage:
            run.keep_best(val_acc, model, **done)
        # epoch_N.pt: the weights after N epochs (this is log epoch N-1), as the released
        # checkpoint_N; a starting point for another run (init_from), like best.pt
        if keep_epoch_checkpoints:
            run.save_weights(f"epoch_{epoch + 1}.pt", model, **done)
        run.save(model, optimizer, epoch=epoch + 1, step_in_epoch=0, stage=cur.stage(epoch + 1),
                 iter_num=iter_num)
    run.end(model)

    # ---- final: the best-by-val weights (else the last; never a stale best.pt of an earlier run),
    # a pretrained model's result as a save_pretrained directory, the test at the final stage
    if not eval_only and run.best >= 0:
        run.load_best(model)
    if base != "scratch" and not eval_only:
        run.export(model, tok)
    test_prompts = eval_prompts(encoded["test"][mine], cur.final_stage, cur, n_test_thoughts)
    test_acc, test_tok, texts = metrics.greedy_accuracy(model, train_model, test_prompts,
                                                        golds["test"], dec)
    print0(f"test acc {test_acc:.4f} | tokens generated {test_tok:.1f} (thoughts included) | "
           f"{len(encoded['test'])} examples")
    run.log({"test_acc": test_acc, "test_tokens": test_tok}, step=iter_num)

    # ---- the paper's analyses: the same model tested with other numbers of thoughts (no
    # retraining), a Markdown table and thoughts_sweep.json ...
    sweep = []
    for n in sweep_counts:
        prompts = eval_prompts(encoded["test"][mine], cur.final_stage, cur, n)
        acc, n_tokens, _ = metrics.greedy_accuracy(model, train_model, prompts, golds["test"],
                                                   dec)
        sweep.append({"thoughts": n, "accuracy": acc, "tokens": n_tokens})
        if len(sweep) == 1:
            print0("| thoughts | test acc | tokens generated (thoughts included) |\n|---|---|---|")
        print0(f"| {n} | {acc:.4f} | {n_tokens:.1f} |")
    if sweep:
        run.write_json("thoughts_sweep.json", {"init_from": init_from, "method": method,
                                               "examples": len(encoded["test"]), "rows": sweep})
    # ... and what each continuous thought encodes, read through the LM head (rank 0 prints; FSDP:
    # every rank probes inside gathered(), a collective)
    n_probe = probe if ddp_rank == 0 or fsdp else 0
    with parallel.gathered(train_model):
        for prompt, text in zip(test_prompts[:n_probe], texts[:n_probe]):
            print0(f"--- {tok.decode(prompt, skip_special_tokens=False)!r} -> {text!r}")
            if feedback_id not in prompt:
                continue
            probs, ids = probe_thoughts(model, prompt, feedback_id, probe_topk, device)
            for j, (top_p, top_ids) in enumerate(zip(probs.tolist(), ids.tolist())):
                words = [f"{tok.decode([i], skip_special_tokens=False)!r} {q:.2f}"
                         for i, q in zip(top_ids, top_p)]
                print0(f"    thought {j + 1}: " + "  ".join(words))
    run.close()
