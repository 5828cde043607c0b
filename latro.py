"""
LaTRO: Latent Reasoning Optimization (Chen et al., "Language Models are Hidden Reasoners: Unlocking
Latent Reasoning Capabilities via Self-Rewarding", arXiv 2411.04282).

The rationale z is a latent variable. The model samples K rationales per question, and each is
rewarded by the model's own log-likelihood of the gold answer after it, minus a KL penalty to the
frozen initial model π0. No reward model and no gold rationales: the model is reasoner and rewarder
at once. The paper's equations, as this file names them:

  objective  J(θ) = E_(x,y) [ E_{z~πθ(·|x)} log πθ(y | x⊕z) − β·KL(πθ(z|x) ‖ π0(z|x)) ]
  gradient   ∇J ≈ 1/(NK) Σ_i Σ_k [ A_ik ∇log πθ(z_ik | x_i) + ∇log πθ(y_i | x_i⊕z_ik) ]
             (N prompts × K rationales; the paper's Eq. 4)
  reward     r_ik = log πθ(y_i | x_i⊕z_ik) − β·Σ_t [log πθ(z_ik,t) − log π0(z_ik,t)]
             (sequence sums, detached)
  advantage  A_ik = r_ik − 1/(K−1) Σ_{j≠k} r_ij   (the RLOO leave-one-out baseline)

One on-policy update per rollout batch: no advantage normalisation, no clipping, no PPO ratio. The
second term of ∇J has weight `sft_coef`: 0 in the released code (the default here), 1.0 for Eq. 4.

Launch:
    python latro.py                          # CPU demo: modsum, tiny model, SFT warm-up then LaTRO
    python latro.py --latro_steps=0          # the SFT warm-up alone (the SFT baseline)
    python latro.py --init_from=resume       # continue out_dir/ckpt.pt exactly
    python latro.py config/latro_gsm8k.py --init_from=Qwen/Qwen2.5-1.5B-Instruct \\
        --batch_size=3                       # 1 GPU
    torchrun --standalone --nproc_per_node=8 latro.py config/latro_gsm8k.py   # 8 GPUs, as the paper
    torchrun --standalone --nproc_per_node=8 latro.py config/latro_sft_gsm8k.py   # SFT baseline
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --master_addr=HOST --master_port=29500 \\
        latro.py config/latro_gsm8k.py --batch_size=48    # 2 nodes (--node_rank=1 on the other)
"""

import datetime
import difflib
import importlib.util
import math
import os
import re
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from transformers import AutoConfig

from configurator import UserError, configure, exit_cleanly_on_user_error
from data import (PROMPT_STYLES, TASKS, build_tokenizer, check_split_overlap, latro_answer,
                  latro_prompt, latro_rationale, load_task, sft_target)
from evaluate import CHECKERS, latro_correct, majority_correct
from model import (StopRequest, all_sum, autocast_ctx, backbone, check_memory_plan, check_same_run,
                   device_memory_bytes, enable_activation_checkpointing, end_distributed,
                   estimate_activation_bytes, estimate_kv_cache_bytes, format_memory_plan,
                   fsdp_wrap, full_state_dicts, gather_full, gathered, generate, left_pad,
                   load_checkpoint, load_full_state_dicts, load_model, memory_plan,
                   n_params_of_config, nonfinite_names, position_ids_from_mask, prepare_out_dir,
                   ranks_identical, save_checkpoint, set_grad_sync, token_logprobs, wandb_logger)
# (renamed on import: `export_hf` is also the config key that switches the export on)
from model import export_hf as write_hf_export

# -----------------------------------------------------------------------------
# configuration: the defaults are the embedded CPU demo (a few minutes on 2 cores); paper values in
# comments
# I/O
out_dir = "out/latro"          # ckpt.pt (resume), best.pt (best val weights), hf/ (save_pretrained)
init_from = "scratch"          # 'scratch' (tiny model), 'resume' (out_dir/ckpt.pt), HF name or dir
eval_interval = 25             # LaTRO steps between val evaluations and checkpoints
stop_at_step = 0               # end this run after this LaTRO step (resume later); 0 = never
export_hf = True               # write out_dir/hf (save_pretrained: model + tokenizer) at the end
overwrite = False              # a scratch run may delete an earlier run's ckpt.pt / best.pt
wandb_log = False              # log to Weights & Biases (imported only when True)
wandb_project = "nanolatent"   # wandb project
wandb_run_name = "latro"       # wandb run name
# data
task = "modsum"                # modsum (CPU demo) | gsm8k | arc | a data.py task with a numeric or
                               # text answer
data_path = ""                 # local file for gsm8k / arc / json; '' = generate or download
split_layout = ""              # one local file for all splits: 'tail:VAL,TEST' (data.load_task)
n_train = 0                    # training questions (0 = the task's default size)
n_val = 200                    # val questions: evaluation during training and model selection
n_test = 500                   # test questions: scored before LaTRO and at the end, never to select
tokenizer = ""                 # '' = word-level vocabulary for scratch models, else the model's own
prompt = "cot"                 # cot (LaTRO) | sft (the released SFT baseline's training prompt)
eval_prompt = ""               # '' = prompt | cot | sft_eval (released eval prompt of SFT models)
arc_options = "released"       # ARC options: released (a plain list of texts) | lettered ((A) text)
# model (init_from='scratch')
arch = "gpt2"                  # gpt2 | llama
n_layer = 3                    # 3 x 128 dims, 4 heads: 0.63M parameters with the modsum vocabulary
n_head = 4
n_embd = 128
block_size = 256               # longest sequence (positions) of a scratch model
dropout = 0.0                  # keep 0: the update must see the same policy that made the rollouts
                               # (pretrained models get their dropout switched off, as released)
attn_implementation = "auto"   # auto = flash_attention_2 on CUDA when installed, else sdpa
gradient_checkpointing = False # recompute activations in the backward (long rationales, big models)
# SFT warm-up on gold rationales (also the SFT baseline; 0 steps for pretrained models)
sft_share = 0.1                # share of the training questions whose gold rationale SFT may use
sft_steps = 2000               # maximum warm-up steps
sft_epochs = 0.0               # > 0: sft_steps = ceil(sft_epochs x gold rows / sft_batch_size)
sft_batch_size = 64            # sequences per step, all ranks together
sft_learning_rate = 1e-3       # AdamW learning rate
sft_decay = False              # decay sft_learning_rate linearly to 0 (released SFT baseline)
sft_eval_interval = 20         # steps between val evaluations during the warm-up
sft_target_acc = 0.45          # stop the warm-up once val accuracy reaches this (0 = all sft_steps)
# LaTRO
latro_steps = 200              # optimizer steps: the budget (released GSM8K "6 epochs" = 117 steps)
batch_size = 8                 # prompts per optimizer step, all ranks together (paper: 24 = 8 x 3)
rloo_k = 8                     # K rationales per prompt (paper: 16)
micro_batch_size = 64          # rollouts per forward/backward on one rank (paper: 4); sets the
                               # gradient accumulation
gen_batch_size = 256           # rows per generate call (rollouts and evaluation)
max_rationale_tokens = 40      # L, longest sampled rationale (paper: 500)
temperature = 1.0              # rollout sampling temperature (paper: 1)
top_p = 1.0                    # rollout nucleus (paper: 1, no top-p)
stop_strings = "released"      # 'released' (the 18 RELEASED_STOP_STRINGS) or 'A|B': found in text
beta = 0.05                    # KL coefficient (paper: 0.05 GSM8K, 0.25 ARC-Challenge)
gamma = 2.0                    # a non-stopped rationale's reward: gamma x mean raw (paper: 2)
penalty = "group"              # non-stopped penalty baseline: group (the prompt's K samples) |
                               # rank_mean (released) | none
sft_coef = 0.0                 # weight of ∇log π(y|x,z): 0 = released recipe, 1.0 = paper's Eq. 4
learning_rate = 1e-4           # AdamW peak, linear decay to 0, no warm-up (paper: 5e-7, pretrained)
weight_decay = 0.0             # (paper: 0)
# evaluation
checker = "released"           # released (as the paper's code: comparable numbers) | fixed
max_new_tokens = 64            # greedy / maj@k generation length: rationale + answer (paper: 500)
maj_k = 8                      # samples per question for maj@k (self-consistency), T=1; 0 = greedy
# system
device = "auto"                # auto | cpu | cuda
seed = 1337                    # data order, initial weights, rollouts (seeded by seed, step, rank)
fsdp = False                   # FSDP2: shard weights, gradients, optimizer state and π0
ddp_timeout = 1800             # seconds a rank waits in a collective (a dead peer) before it ends
# the keys' former names: an old name is refused with its new one
RENAMED = {"lr": "learning_rate", "sft_lr": "sft_learning_rate", "n_dev": "n_val",
           "ddp_timeout_s": "ddp_timeout", "eval_max_tokens": "max_new_tokens"}
# a config file and --key=value override the defaults (importing the module keeps them); from here
# on a UserError prints one line and exits 1, while a bug keeps its traceback
if __name__ == "__main__":
    exit_cleanly_on_user_error()
    config = configure(globals(), sys.argv[1:], renamed=RENAMED)

# -----------------------------------------------------------------------------
# the method

def batch_layout(batch_size, rloo_k, micro_batch_size, world_size):
    """Per-rank counts from the global ones. Each rank owns whole groups of K, so the leave-one-out
    baseline never needs another rank's rewards, and every rank runs the same number of micro-steps
    (or DDP's backward hangs). Returns prompts per rank, rollouts per rank, accumulation steps."""
    if rloo_k < 2:
        raise UserError(f"rloo_k={rloo_k}: the leave-one-out baseline needs at least 2 rationales "
                        f"per prompt")
    if batch_size % world_size:
        raise UserError(f"batch_size={batch_size} prompts per step do not split over "
                        f"{world_size} ranks: make batch_size a multiple of {world_size} or change "
                        f"the number of processes")
    prompts = batch_size // world_size
    rollouts = prompts * rloo_k
    if rollouts % micro_batch_size:
        raise UserError(f"each rank has {prompts} prompts x rloo_k={rloo_k} = {rollouts} "
                        f"rollouts, which micro_batch_size={micro_batch_size} does not divide: "
                        f"pick a micro_batch_size dividing {rollouts}, or change batch_size / "
                        f"rloo_k")
    return prompts, rollouts, rollouts // micro_batch_size

def disable_dropout(model):
    """Dropout off everywhere, as the released trainer does for policy and reference: trl's
    disable_dropout_in_model zeroes nn.Dropout modules; attention dropout handed to the kernel as a
    float attribute is zeroed too."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("attention_dropout", "attn_dropout", "dropout"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    return model

# The released stop strings (trainer_config.stop_seqs), lowercase and tool-call phrasings included.
# They are found in the decoded text: SentencePiece spells "The" after a newline as another piece
# than at the start of an encoded string, so matching the ids of encode(stop) misses the common
# case.
RELEASED_STOP_STRINGS = [
    "Answer:", " Answer:", "\nAnswer:",
    "The answer is", " The answer is", "\nThe answer is",
    "The answer is:", " The answer is:", "\nThe answer is:",
    " the answer is", "so the final answer is", "So, the answer is", "Therefore, the answer is",
    "The function call is:", "\nThe function call is:", "The function call is",
    "\nThe function call is", "the function call is",
]

def parse_stop_strings(spec):
    """'released' -> RELEASED_STOP_STRINGS; otherwise '|'-separated strings ('' = stop ids only)."""
    if spec == "released":
        return list(RELEASED_STOP_STRINGS)
    return [s for s in spec.split("|") if s]

def first_stop(text, strings):
    """Character index where the first stop string of text starts, or -1."""
    starts = [i for i in (text.find(s) for s in strings) if i >= 0]
    return min(starts) if starts else -1

def cut_at_stop(tok, ids, stop_ids, strings):
    """(length, stopped): a rationale is ids[:length], cut strictly before its first stop: a stop id
    (eos, pad, end-of-turn) or a stop string in the decoded text. The cut falls on the last token
    boundary at or before the stop's first character (a stop starting inside a token cuts before
    that token). 'First' is the stop the sampler sees first: the earliest start among the stops
    complete in the shortest prefix that holds one."""
    ids = [int(t) for t in ids]
    n = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
    if not strings or first_stop(tok.decode(ids[:n]), strings) < 0:
        return n, n < len(ids)
    # the shortest prefix whose text holds a stop (once a prefix holds one, every longer one does)
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if first_stop(tok.decode(ids[:mid]), strings) >= 0:
            hi = mid
        else:
            lo = mid + 1
    text = tok.decode(ids[:lo])
    s = first_stop(text, strings)
    # the last boundary before the stop: a prefix whose text is text's own beginning (byte-fallback
    # pieces of a half-decoded character print as U+FFFD: no boundary) and ends at or before s
    for k in range(lo - 1, -1, -1):
        head = tok.decode(ids[:k])
        if len(head) <= s and text.startswith(head):
            return k, True
    return 0, True

def tail_stop_check(tok, strings):
    """A decode() stop_check: the rows whose newest tokens' text holds a stop string. Only the last
    `window` tokens are decoded per step: a stop of b UTF-8 bytes spans at most b tokens (every
    token decodes to at least one byte), and two more absorb what differs when a suffix is decoded
    alone (SentencePiece drops the first piece's leading space; a byte-fallback piece cut from its
    character prints U+FFFD). A suffix decoded alone never holds a stop the full text does not hold,
    so no row stops early by mistake."""
    window = max(len(s.encode("utf-8")) for s in strings) + 2

    def check(tokens, finished):  # tokens (B, t), finished (B,) bool -> (B,) bool
        hit = torch.zeros_like(finished)
        rows = (~finished).nonzero().flatten().tolist()
        for r, tail in zip(rows, tokens[rows, -window:].tolist()):
            hit[r] = first_stop(tok.decode(tail), strings) >= 0
        return hit
    return check

def build_batch(prompts, rationales, answers, pad_id, device="cpu"):
    """Rows [x, z, y], right-padded. Returns input_ids, attention_mask (B, T) and the token masks
    of z and of y (B, T)."""
    T = max(len(x) + len(z) + len(y) for x, z, y in zip(prompts, rationales, answers))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    attn, z_mask, y_mask = (torch.zeros(len(prompts), T, dtype=torch.bool) for _ in range(3))
    for i, (x, z, y) in enumerate(zip(prompts, rationales, answers)):
        a, b, c = len(x), len(x) + len(z), len(x) + len(z) + len(y)
        ids[i, :c] = torch.tensor(x + z + y)
        attn[i, :c] = True
        z_mask[i, a:b] = True
        y_mask[i, b:c] = True
    return tuple(t.to(device) for t in (ids, attn.long(), z_mask, y_mask))

class SequenceScorer(torch.nn.Module):
    """The two log-likelihoods of the paper's equations, from one pass over [x, z, y]:
    log πθ(z | x) = Σ_t log π(z_t | x, z_<t) (the rationale, in the reward's KL term and the
    policy-gradient term of ∇J) and log πθ(y | x⊕z) = Σ_t log π(y_t | x, z, y_<t) (the self-reward,
    and the second term of ∇J). In fp32, with the LM head applied only at the z and y positions. It
    is an nn.Module so that DDP wraps it: one DDP forward per backward, both terms in it."""
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, z_mask, y_mask):
        positions = position_ids_from_mask(attention_mask)
        hidden = backbone(self.model)(input_ids=input_ids, attention_mask=attention_mask,
                                      use_cache=False, position_ids=positions).last_hidden_state
        # the hidden state at t predicts token t+1
        z_t, y_t = z_mask[:, 1:], y_mask[:, 1:]
        logp = token_logprobs(self.model, hidden[:, :-1], input_ids[:, 1:], z_t | y_t)  # (B, T-1)
        # (B,), (B,): sums over exactly the z tokens and exactly the y tokens
        return (logp * z_t).sum(1), (logp * y_t).sum(1)

def latro_rewards(logp_y, logp_z, ref_logp_z, stopped, rloo_k, beta, gamma, penalty):
    """The reward r_ik = log π(y|x,z_ik) − β (log π(z_ik|x) − log π0(z_ik|x)): the self-reward minus
    the sequence-level KL estimate, the quantity inside the objective J(θ). A non-stopped
    rationale's raw reward is replaced by γ × the mean raw reward of its group ('group') or of the
    rank's batch ('rank_mean', as released; that couples groups and can raise a very bad sample).
    Rewards are negative, so γ > 1 is a penalty on average. Returns rewards and KL, (N·K,) each."""
    raw = logp_y
    if penalty == "group":
        group_mean = raw.view(-1, rloo_k).mean(1).repeat_interleave(rloo_k)
        raw = torch.where(stopped, raw, gamma * group_mean)
    elif penalty == "rank_mean":
        raw = torch.where(stopped, raw, gamma * raw.mean())
    elif penalty != "none":
        raise ValueError(f"penalty={penalty!r}: use 'group', 'rank_mean' or 'none'")
    kl = logp_z - ref_logp_z  # sequence-level KL estimate on the sampled z
    return raw - beta * kl, kl

def rloo_advantages(rewards, rloo_k):
    """The advantage A_ik = r_ik − 1/(K−1) Σ_{j≠k} r_ij (the RLOO leave-one-out baseline of the
    gradient estimate ∇J), for rewards (N·K,) laid out group by group."""
    r = rewards.view(-1, rloo_k)  # (N, K)
    baseline = (r.sum(1, keepdim=True) - r) / (rloo_k - 1)
    return (r - baseline).view(-1)

def latro_loss(logp_z, logp_y, advantages, sft_coef):
    """The surrogate whose gradient is minus the estimate ∇J (the paper's Eq. 4 at sft_coef 1):
    mean(−A·log π(z)) + sft_coef · mean(−log π(y|x,z)); A is a constant."""
    loss = -(advantages.detach() * logp_z).mean()
    if sft_coef:
        loss = loss - sft_coef * logp_y.mean()
    return loss

@torch.no_grad()
def sample(model, prompts, max_new_tokens, pad_id, chunk, ctx, *, tok, stop_ids, stop_strings,
           early_stop=True, generator=None, **decode_kwargs):
    """Batched, KV-cached generation that stops each row at its first stop (a stop id, or a stop
    string in its decoded text) and the batch once all rows stopped. early_stop=False runs all
    max_new_tokens (tests: the cut outputs are the same). Returns the continuations cut before their
    first stop (cut_at_stop), stopped flags (N,) and the number of decoded positions."""
    device = next(model.parameters()).device
    starts = range(0, len(prompts), chunk)
    # one seed per chunk, drawn up front: a chunk that stops early must not shift the next one's
    # draws
    seeds = None
    if generator:
        seeds = torch.randint(2**62, (len(starts),), generator=generator, device=device).tolist()
    id_stops = [[i] for i in sorted(stop_ids)] if early_stop else []
    check = tail_stop_check(tok, stop_strings) if early_stop and stop_strings else None
    outs, flags, n_tok = [], [], 0
    for c, i in enumerate(starts):
        ids, mask = left_pad(prompts[i:i + chunk], pad_id, device)
        g = torch.Generator(device=device).manual_seed(seeds[c]) if generator else None
        with ctx:
            tokens, _ = generate(model, ids, mask, max_new_tokens, stop_sequences=id_stops,
                                 pad_id=pad_id, generator=g, stop_check=check, **decode_kwargs)
        for row in tokens.tolist():
            n, stopped = cut_at_stop(tok, row, stop_ids, stop_strings)
            outs.append(row[:n])
            flags.append(stopped)
        n_tok += tokens.numel()
    return outs, torch.tensor(flags, dtype=torch.bool), n_tok

@torch.no_grad()
def score_rows(scorer, prompts, rationales, answers, pad_id, chunk, ctx):
    """(Σ log π(z), Σ log π(y|x,z)) for every row, in right-sized chunks of `chunk` rows."""
    device = next(scorer.parameters()).device
    out = []
    for i in range(0, len(prompts), chunk):
        rows = (prompts[i:i + chunk], rationales[i:i + chunk], answers[i:i + chunk])
        batch = build_batch(*rows, pad_id, device)
        with ctx:
            out.append(torch.stack(scorer(*batch), 1))
    logp = torch.cat(out)
    return logp[:, 0], logp[:, 1]

@torch.no_grad()
def evaluate_split(model, task, examples, prompts, answers, *, tok, stop_strings, checker,
                   max_new_tokens, maj_k, chunk, ctx, generator):
    """Sums over examples: greedy correct, maj@k correct, log π(y | x, z_greedy); and the count.
    Outputs end at eos / end-of-turn only (as released); the answer log-likelihood puts the gold
    answer after the greedy output cut at its first stop, as the reward does."""
    model.eval()
    eos = {tok.eos_id, tok.end_of_turn_id}
    outs, _, _ = sample(model, prompts, max_new_tokens, tok.pad_id, chunk, ctx, tok=tok,
                        stop_ids=eos, stop_strings=[])
    texts = [tok.decode(o) for o in outs]
    correct = sum(latro_correct(task, t, ex, checker=checker) for t, ex in zip(texts, examples))
    cut = [o[:cut_at_stop(tok, o, eos | {tok.pad_id}, stop_strings)[0]] for o in outs]
    _, logp_y = score_rows(SequenceScorer(model), prompts, cut, answers, tok.pad_id, chunk, ctx)
    maj = 0
    if maj_k:
        many = [p for p in prompts for _ in range(maj_k)]
        outs, _, _ = sample(model, many, max_new_tokens, tok.pad_id, chunk, ctx, tok=tok,
                            stop_ids=eos, stop_strings=[], temperature=1.0, generator=generator)
        texts = [tok.decode(o) for o in outs]
        maj = sum(majority_correct(task, texts[i * maj_k:(i + 1) * maj_k], ex, checker)
                  for i, ex in enumerate(examples))
    return torch.tensor([correct, maj, logp_y.sum().item(), len(examples)], dtype=torch.float64)

def step_indices(step, n_per_step, n_data, seed):
    """The questions of one step: consecutive slices of one seeded permutation per epoch (so resume
    is exact)."""
    first = step * n_per_step
    perms = [torch.randperm(n_data, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
             for epoch in range(first // n_data, (first + n_per_step - 1) // n_data + 1)]
    start = first % n_data
    return sum(perms, [])[start:start + n_per_step]

def rank_prompts(step, batch_size, n_data, seed, rank, world_size):
    """The questions this rank rolls out at a step: its contiguous share of the step's batch_size
    questions (step_indices). The ranks' shares are disjoint and together are exactly the questions
    a single process takes at that step."""
    per_rank = batch_size // world_size
    return step_indices(step, batch_size, n_data, seed)[rank * per_rank:(rank + 1) * per_rank]

def rollout_seed(seed, step, rank):
    """The seed of the rollout sampler at optimizer step `step` on a rank: a function of
    (seed, step, rank) only, so a resumed run draws the same rationales, every step draws new ones
    and every rank draws its own."""
    return seed + 1_000_003 * step + rank

def lr_at(step, lr, total_steps):
    """The learning rate of optimizer step `step` (0-based) of total_steps: linear decay from lr
    to 0, no warm-up, as released (the first step uses lr, the last lr / total_steps)."""
    return lr * (1 - step / total_steps)

def local(t):
    """This rank's part of a tensor: the local shard of an FSDP DTensor, else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t

def nonfinite_grads(model):
    """How many of this rank's gradient tensors (shards under FSDP) hold a NaN or an inf."""
    grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
    return sum(not bool(torch.isfinite(g).all()) for g in grads)

def format_metrics(metrics):
    """'acc 0.5000 maj@8 0.6250 answer_logp -1.2345' for a log line."""
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())

# ---- the SFT warm-up: a short supervised phase before LaTRO (a first reading can skip it)

def sft_warmup(scorer, model, optimizer, gold, first_step, total_steps, *, batch_size,
               micro_batch_size, learning_rate, decay, eval_interval, target_acc, val_acc, seed,
               rank, world_size, pad_id, device, ctx, stop, save, finish, log):
    """Supervised steps on gold rows [x, z*, y] (gold = their token lists xs, zs, ys): the
    token-mean NLL of z* and y, steps first_step..total_steps-1, until val_acc() (run every
    eval_interval steps and at the end) reaches target_acc (0 = never). A scratch model learns the
    answer format here, so LaTRO's rollouts can reach an answer at all; with latro_steps=0 this is
    the SFT baseline. scorer: the (DDP/FSDP-wrapped) SequenceScorer of model. save(step) writes
    ckpt.pt (resume continues at that step) and returns its path; finish(code, message) ends the
    run on every rank."""
    gold_x, gold_z, gold_y = gold
    per_rank = batch_size // world_size
    t0 = time.time()
    for it in range(first_step, total_steps + 1):
        # val accuracy every eval_interval steps: the warm-up ends at the target or after its
        # last step
        if it % eval_interval == 0 or it == total_steps:
            acc = val_acc()
            log(f"sft {it}/{total_steps} | val acc {acc:.4f} | {time.time() - t0:.1f}s")
            if it == total_steps or 0 < target_acc <= acc:
                break
        # linear decay, no warm-up: the HF Trainer default the released SFT baseline ran with
        if decay:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it, learning_rate, total_steps)
        # this rank's share of the step's gold rows; the loss is a token mean over that whole share
        idx = rank_prompts(it, batch_size, len(gold_x), seed, rank, world_size)
        xs = [gold_x[i] for i in idx]
        zs = [gold_z[i] for i in idx]
        ys = [gold_y[i] for i in idx]
        n_tok = sum(len(z) + len(y) for z, y in zip(zs, ys))
        # forward and backward per micro-batch; DDP all-reduces on the last micro-step only
        model.train()
        starts = range(0, per_rank, micro_batch_size)
        bad = torch.zeros(1)
        for j, s in enumerate(starts):
            set_grad_sync(scorer, j == len(starts) - 1)
            rows = (xs[s:s + micro_batch_size], zs[s:s + micro_batch_size],
                    ys[s:s + micro_batch_size])
            with ctx:
                logp_z, logp_y = scorer(*build_batch(*rows, pad_id, device))
            loss = -(logp_z + logp_y).sum() / n_tok
            loss.backward()
            bad += not torch.isfinite(loss).item()
        # a nan/inf anywhere stops every rank together, before the update
        if all_sum(bad + nonfinite_grads(model), device).item():
            finish(1, f"sft step {it}: the loss or a gradient is nan/inf; stopping before the "
                      f"update (nothing saved from this warm-up): lower sft_learning_rate, or "
                      f"check the data")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # Ctrl-C / SIGTERM (on any rank): checkpoint this step and exit
        if stop.requested(device):
            path = save(it + 1)
            signum = stop.signum or signal.SIGTERM  # (the signal may have reached another rank)
            finish(128 + signum, f"stopped by {signal.Signals(signum).name} at sft step {it + 1}; "
                                 f"{path} saved: continue with --init_from=resume")

# ---- the up-front check: every mistake in the configuration is found before data, model or out_dir

MODEL_KEYS = ("arch", "n_layer", "n_head", "n_embd", "block_size")  # a scratch model's shape
RESUME_KEYS = ("task", "data_path", "split_layout", "n_train", "tokenizer", "seed", "prompt",
               "arc_options")  # what a resumed run must share with its checkpoint (plus MODEL_KEYS)

def check_config(cfg, world_size=1, distributed=False, cuda_available=False):
    """Raise a UserError for the first setting that cannot work or would train silently wrong; the
    message names the key and what to do. Names are checked before numbers and the task before its
    options, so a typo is reported as a typo."""
    def fail(msg):
        raise UserError(msg)
    if cfg["task"] not in TASKS:
        close = difflib.get_close_matches(cfg["task"], TASKS, n=1)
        fail(f"task={cfg['task']!r} is unknown; " + (f"did you mean {close[0]}?" if close else
                                                    f"known: {', '.join(TASKS)}"))
    choices = [("arch", ("gpt2", "llama")), ("penalty", ("group", "rank_mean", "none")),
               ("checker", CHECKERS), ("prompt", ("cot", "sft")),
               ("eval_prompt", ("",) + PROMPT_STYLES),
               ("arc_options", ("released", "lettered"))]
    for key, allowed in choices:
        if cfg[key] not in allowed:
            fail(f"{key}={cfg[key]!r}: use one of {', '.join(repr(a) for a in allowed)}")
    dev = cfg["device"]
    if dev not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", dev):
        fail(f"device={dev!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if dev.startswith("cuda") and not cuda_available:
        fail(f"device={dev!r} but this torch sees no CUDA GPU: use --device=cpu or 'auto'")
    spec = cfg["stop_strings"]
    if spec != "released" and difflib.get_close_matches(spec, ["released"], cutoff=0.75):
        fail(f"stop_strings={spec!r}: did you mean 'released'? (to stop at that text, write it as "
             f"'{spec}|' )")
    if any(not s.strip() for s in parse_stop_strings(spec)):
        fail(f"stop_strings={spec!r} holds a blank stop string: it would cut every rationale at "
             f"the first space; separate real strings with '|'")
    if cfg["init_from"] not in ("scratch", "resume") and os.path.isfile(cfg["init_from"]):
        fail(f"init_from={cfg['init_from']!r} is a file; give a directory written by "
             f"save_pretrained, a hub name, 'scratch' or 'resume'")
    for key, value in cfg.items():
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"{key}={value}: give a finite number")
    positive = ("batch_size", "micro_batch_size", "gen_batch_size", "max_new_tokens",
                "eval_interval", "sft_batch_size", "sft_eval_interval", "learning_rate",
                "sft_learning_rate", "ddp_timeout", "gamma", "n_layer", "n_head", "n_embd",
                "block_size")
    for key in positive:
        if cfg[key] <= 0:
            fail(f"{key}={cfg[key]}: give a value > 0")
    # documented zeros: 0 steps (no warm-up / LaTRO), 0 = the task's default size, maj_k 0 = greedy
    at_least_zero = ("latro_steps", "sft_steps", "sft_epochs", "stop_at_step", "n_train", "n_val",
                     "n_test", "maj_k", "beta", "sft_coef", "weight_decay", "sft_target_acc")
    for key in at_least_zero:
        if cfg[key] < 0:
            meaning = " (0 = the task's default size)" if key.startswith("n_") else ""
            fail(f"{key}={cfg[key]}: give a value >= 0{meaning}")
    # rollouts that cannot teach: K equal rationales get equal rewards, so every advantage is 0
    if cfg["temperature"] <= 0:
        fail(f"temperature={cfg['temperature']}: greedy rollouts make the K rationales of a prompt "
             f"identical, so every RLOO advantage is 0 and LaTRO learns nothing; use > 0 "
             f"(paper: 1)")
    if not 0 < cfg["top_p"] <= 1:
        fail(f"top_p={cfg['top_p']}: use 0 < top_p <= 1 (1 = no nucleus, as in the paper); "
             f"top_p -> 0 is greedy, whose identical rollouts give zero advantages")
    if cfg["max_rationale_tokens"] <= 0:
        fail(f"max_rationale_tokens={cfg['max_rationale_tokens']}: LaTRO optimises the rationale, "
             f"so it needs at least one token (paper: 500)")
    if not 0 < cfg["sft_share"] <= 1:
        fail(f"sft_share={cfg['sft_share']}: a share of the training questions, use a value in "
             f"(0, 1]")
    if cfg["sft_target_acc"] > 1:
        fail(f"sft_target_acc={cfg['sft_target_acc']}: an accuracy, use a value in [0, 1] "
             f"(0 = run all sft_steps)")
    if not 0 <= cfg["dropout"] < 1:
        fail(f"dropout={cfg['dropout']}: use a value in [0, 1) (keep 0, see its comment)")
    if cfg["init_from"] == "scratch" and cfg["n_embd"] % cfg["n_head"]:
        fail(f"n_embd={cfg['n_embd']} is not a multiple of n_head={cfg['n_head']}")
    # runs that would report an untrained model or contradict themselves
    no_warm_up = cfg["sft_steps"] == 0 and cfg["sft_epochs"] == 0
    if cfg["init_from"] == "scratch" and no_warm_up and cfg["latro_steps"] == 0:
        fail("init_from='scratch' with no SFT warm-up (sft_steps=0) and latro_steps=0 trains "
             "nothing: the test accuracy would be a random model's; set sft_steps or latro_steps, "
             "or evaluate a trained model with evaluate.py")
    if cfg["init_from"] == "resume" and cfg["overwrite"]:
        fail("init_from='resume' continues out_dir's checkpoint and overwrite=True deletes it: "
             "choose one")
    if cfg["fsdp"] and not distributed:
        fail("fsdp=True shards over the processes of a torchrun launch: run "
             "torchrun --nproc_per_node=N latro.py ... (N >= 2), or leave fsdp=False")
    if cfg["wandb_log"] and importlib.util.find_spec("wandb") is None:
        fail("wandb_log=True but wandb is not installed: pip install wandb, or --wandb_log=False")
    if cfg["sft_batch_size"] % world_size:
        fail(f"sft_batch_size={cfg['sft_batch_size']} does not split over {world_size} ranks: "
             f"make it a multiple of {world_size}")
    return batch_layout(cfg["batch_size"], cfg["rloo_k"], cfg["micro_batch_size"], world_size)

def check_lengths(n_positions, prompts, answers, gold, max_rationale_tokens, max_new_tokens):
    """A UserError when a sequence could outgrow the model's n_positions: a rollout (prompt +
    max_rationale_tokens + answer), an evaluation (prompt + max_new_tokens + answer) or a gold
    warm-up row (token lists of prompt, rationale, answer). Returns the longest length.
    n_positions None: a model without a position limit in its config (nothing to check)."""
    need = max(len(x) + len(y) for x, y in zip(prompts, answers))
    need += max(max_rationale_tokens, max_new_tokens)
    longest_gold = max((sum(map(len, row)) for row in gold), default=0)
    if n_positions is not None and max(need, longest_gold) > n_positions:
        raise UserError(f"the longest sequence needs {max(need, longest_gold)} positions (prompt + "
                        f"answer + max(max_rationale_tokens, max_new_tokens) = {need}, gold "
                        f"warm-up row {longest_gold}) but the model has {n_positions}: raise "
                        f"block_size (scratch) or lower max_rationale_tokens / max_new_tokens")
    return max(need, longest_gold)

def check_resume(ckpt, config, path):
    """Resume tells the truth: a checkpoint of another script, or of a run with another task, data,
    tokenizer, seed or (scratch) model shape, is refused, naming the keys that differ."""
    # (checkpoints from before the "script" entry are recognised by π0's slot)
    script = ckpt.get("script", "latro" if "ref_model" in ckpt else "?")
    if script != "latro":
        raise UserError(f"{path} was not written by latro.py (script {script!r}): "
                        f"point --out_dir at a latro.py run, or start with --init_from=scratch")
    keys = (MODEL_KEYS if ckpt["source"] == "scratch" else ()) + RESUME_KEYS
    check_same_run(ckpt["config"], config, keys)

# -----------------------------------------------------------------------------
if __name__ == "__main__":
    # ---- the configuration, checked whole before any data, model or out_dir is touched
    ddp = int(os.environ.get("RANK", -1)) != -1
    ddp_rank = int(os.environ.get("RANK", 0))
    ddp_world_size = int(os.environ.get("WORLD_SIZE", 1))
    master_process = ddp_rank == 0
    layout = check_config(config, ddp_world_size, ddp, torch.cuda.is_available())
    prompts_per_rank, rollouts_per_rank, grad_accum = layout
    stops = parse_stop_strings(stop_strings)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    # lock, write probe, no silent overwrite; a refusal here ends every rank
    if master_process:
        prepare_out_dir(out_dir, resume=init_from == "resume", overwrite=overwrite)

    # ---- DDP init: one process per GPU (or per CPU worker with gloo); rank 0 logs and checkpoints
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if ddp:
        # a dead peer ends the run after ddp_timeout seconds instead of hanging it
        timeout = datetime.timedelta(seconds=ddp_timeout)
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=timeout)
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    ctx = autocast_ctx(device_type)  # bf16 on CUDA, fp32 on the CPU; log-probs are fp32 either way
    stop = StopRequest()  # Ctrl-C / SIGTERM: checkpoint at the next step boundary, then exit

    def log(message):
        """Rank 0 speaks for every rank."""
        if master_process:
            print(message)

    def finish(code, message):
        """End every rank together: log, leave the process group, exit with `code`."""
        log(message)
        # the DDP wrapper goes first (model.end_distributed says why)
        globals().pop("train_scorer", None)
        end_distributed()
        sys.exit(code)

    # ---- resume: the checkpoint must be this script's, of this run
    ckpt = None
    if init_from == "resume":
        try:
            ckpt = load_checkpoint(ckpt_path)
        except RuntimeError as e:  # corrupt or truncated: say so in one line
            raise UserError(str(e)) from None
        check_resume(ckpt, config, ckpt_path)
    # what the weights were first loaded from, and the phase a checkpoint was written in
    source = init_from
    phase = "sft"
    if ckpt:
        source = ckpt["source"]
        phase = ckpt.get("phase", "latro")

    # ---- data: prompts x in the model's chat template, answers y = "The answer is {gold}." + eot
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    splits = {split: load_task(task, split, path=data_path, n=n, seed=seed,
                               split_layout=split_layout)
              for split, n in sizes.items()}
    check_split_overlap(splits)  # no question scored on what it trained on
    train_ex, val_ex, test_ex = splits["train"], splits["val"], splits["test"]
    tok_name = tokenizer or ("words" if source == "scratch" else source)
    tok = build_tokenizer(tok_name, train_ex + val_ex + test_ex)

    def encode_x(exs, style=prompt):
        """The prompts x of examples, as token lists in the chat template."""
        return [tok.chat_prompt(latro_prompt(ex, task, arc_options, style)) for ex in exs]

    def encode_y(exs):
        """The answers y of examples: the tokens of "The answer is {gold}." then end-of-turn."""
        return [tok.encode(latro_answer(ex["answer"])) + [tok.end_of_turn_id] for ex in exs]

    train_x, train_y = encode_x(train_ex), encode_y(train_ex)
    stop_ids = {tok.eos_id, tok.pad_id, tok.end_of_turn_id}
    log(f"data: {task} train {len(train_ex)} val {len(val_ex)} test {len(test_ex)}, vocab "
        f"{len(tok)}, {len(stops)} stop strings, checker {checker}")
    # the warm-up's gold rows [x, z*, y]: a share of the training questions with their rationales
    gold = train_ex[:max(1, int(sft_share * len(train_ex)))]
    sft_total = sft_steps
    if sft_epochs > 0:
        sft_total = math.ceil(sft_epochs * len(gold) / sft_batch_size)
    gold_x = encode_x(gold)
    if prompt == "sft":  # the released SFT baseline: one target text, then end-of-turn
        gold_z = [tok.encode(sft_target(ex, task)) for ex in gold]
        gold_y = [[tok.end_of_turn_id] for _ in gold]
    else:
        gold_z = [tok.encode(latro_rationale(ex)) for ex in gold]
        gold_y = encode_y(gold)

    # ---- the model's shape without its weights: positions for the longest sequence, memory plan
    if source == "scratch":
        with torch.device("meta"):
            model_cfg = load_model("scratch", len(tok), arch=arch, n_layer=n_layer, n_head=n_head,
                                   n_embd=n_embd, block_size=block_size).config
    else:
        model_cfg = AutoConfig.from_pretrained(source)
    eval_ex = val_ex + test_ex
    n_positions = (getattr(model_cfg, "max_position_embeddings", None)
                   or getattr(model_cfg, "n_positions", None))
    longest = check_lengths(n_positions, train_x + encode_x(eval_ex, eval_prompt or prompt),
                            train_y + encode_y(eval_ex), list(zip(gold_x, gold_z, gold_y)),
                            max_rationale_tokens, max_new_tokens)
    n_params = n_params_of_config(model_cfg)
    kv = estimate_kv_cache_bytes(model_cfg, gen_batch_size, longest)
    acts = estimate_activation_bytes(model_cfg, micro_batch_size * longest,
                                     checkpointing=gradient_checkpointing,
                                     logit_positions=micro_batch_size * (max_rationale_tokens + 16))
    plan = memory_plan(n_params, mode="fsdp" if fsdp else "ddp", world_size=ddp_world_size,
                       precision="bf16" if device_type == "cuda" else "fp32",
                       reference="sharded" if fsdp else "full", grad_accum=grad_accum,
                       kv_cache_bytes=kv, activations_bytes=acts,
                       device_bytes=device_memory_bytes(device))
    log(format_memory_plan(plan))
    check_memory_plan(plan)  # before any weight is loaded

    # ---- model: the same seed on every rank (DDP also broadcasts rank 0's weights)
    def new_model():
        """The initial weights: the same on every rank and every call; the global RNG is left as
        it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            m = load_model(source, len(tok), arch=arch, n_layer=n_layer, n_head=n_head,
                           n_embd=n_embd, block_size=block_size, dropout=dropout, bos_id=tok.bos_id,
                           eos_id=tok.eos_id, pad_id=tok.pad_id,
                           attn_implementation=attn_implementation, device_type=device_type)
        if source != "scratch":  # as released: rollouts, scoring and update see one function
            disable_dropout(m)
        return m

    model = new_model()
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    raw_model = model  # generation, evaluation and checkpoints use the HF model itself
    scorer = SequenceScorer(model)
    if fsdp:  # in place: scorer becomes the root FSDP unit, each decoder layer one unit
        train_scorer = fsdp_wrap(scorer, device_type, bf16=device_type == "cuda")
    else:
        model.to(device)
        train_scorer = scorer
        if ddp:
            device_ids = None
            if device_type == "cuda":
                device_ids = [torch.device(device).index]
            train_scorer = DDP(scorer, device_ids=device_ids)
    if ckpt:
        load_full_state_dicts(raw_model, None, ckpt["model"])
        torch.set_rng_state(ckpt["rng"])
    else:
        torch.manual_seed(seed + ddp_rank)
    log(f"model: {source}, {n_params / 1e6:.2f}M parameters, on {device}"
        f"{' (FSDP)' if fsdp else ''}")

    def run_eval(examples, k=maj_k):
        """Greedy accuracy, maj@k and mean answer log-likelihood over a split, sharded over the
        ranks."""
        mine = examples[ddp_rank::ddp_world_size]
        # a fixed seed: evaluations do not disturb training's random state
        g = torch.Generator(device=device).manual_seed(seed + ddp_rank)
        xs = encode_x(mine, eval_prompt or prompt)
        with gathered(train_scorer):  # FSDP: weights gathered once for the whole split
            sums = evaluate_split(raw_model, task, mine, xs, encode_y(mine), tok=tok, maj_k=k,
                                  stop_strings=stops, checker=checker,
                                  max_new_tokens=max_new_tokens, chunk=gen_batch_size, ctx=ctx,
                                  generator=g)
        sums = all_sum(sums, device)
        correct, maj, answer_logp = (sums[:3] / sums[3]).tolist()
        metrics = {"acc": correct}
        if k:
            metrics[f"maj@{k}"] = maj
        metrics["answer_logp"] = answer_logp
        return metrics

    def weights_finite(what):
        """Every rank checks its weights (its shards) before a save: non-finite ones are never
        written."""
        bad = nonfinite_names((n, local(p)) for n, p in raw_model.named_parameters())
        if all_sum(torch.tensor([float(len(bad))]), device).item():
            finish(1, f"{what}: the weights hold nan/inf ({', '.join(bad[:3]) or 'another rank'}); "
                      f"not saved, {ckpt_path} keeps the last good state: resume with a lower "
                      f"learning rate")

    def save_state(optimizer, **state):
        """ckpt.pt: full (DDP-format) tensors gathered from every rank, written by the master.
        Returns its path."""
        step = state.get("iter_num", state.get("sft_iter"))
        weights_finite(f"saving {state['phase']} step {step}")
        model_sd, optim_sd = full_state_dicts(raw_model, optimizer)  # a collective under FSDP
        if state.get("ref_model") is not None:
            state["ref_model"] = gather_full(state["ref_model"].state_dict())
        if master_process:
            save_checkpoint(ckpt_path, {"script": "latro", "model": model_sd, "optimizer": optim_sd,
                                        "config": config, "source": source,
                                        "rng": torch.get_rng_state(), **state})
        return ckpt_path

    # -----------------------------------------------------------------------------
    # the SFT warm-up (sft_warmup holds its loop; a first reading can skip to LaTRO below)
    if phase == "sft" and sft_total > 0:
        sft_optimizer = torch.optim.AdamW(model.parameters(), lr=sft_learning_rate,
                                          weight_decay=0.0)
        sft_start = 0
        if ckpt:  # a checkpoint written mid-warm-up
            load_full_state_dicts(raw_model, sft_optimizer, ckpt["model"], ckpt["optimizer"])
            sft_start = ckpt["sft_iter"]
        log(f"SFT warm-up: {len(gold)} gold rationales, up to {sft_total} steps of "
            f"{sft_batch_size} ({sft_total * sft_batch_size / len(gold):.2f} epochs), stop at val "
            f"accuracy {sft_target_acc}")

        def sft_val_acc():
            return run_eval(val_ex, k=0)["acc"]

        def save_sft(step):
            return save_state(sft_optimizer, phase="sft", sft_iter=step)

        gold_rows = (gold_x, gold_z, gold_y)
        sft_warmup(train_scorer, model, sft_optimizer, gold_rows, sft_start, sft_total,
                   batch_size=sft_batch_size, micro_batch_size=micro_batch_size,
                   learning_rate=sft_learning_rate, decay=sft_decay,
                   eval_interval=sft_eval_interval, target_acc=sft_target_acc,
                   val_acc=sft_val_acc, seed=seed, rank=ddp_rank, world_size=ddp_world_size,
                   pad_id=tok.pad_id, device=device, ctx=ctx, stop=stop, save=save_sft,
                   finish=finish, log=log)

    # -----------------------------------------------------------------------------
    # LaTRO. Where it stands: the step, the best val accuracy so far (model selection), and
    # `before`, the test metrics of π0 (measured once, printed again at the end).
    resumed = ckpt is not None and phase == "latro"
    iter_num = 0
    best_val_acc = -1.0
    before = None
    if resumed:
        iter_num = ckpt["iter_num"]
        best_val_acc = ckpt.get("best_val_acc", ckpt.get("best_dev_acc"))  # (older: best_dev_acc)
        before = ckpt["before"]

    # ---- the reference model π0: the policy as LaTRO starts (after the warm-up, if any), frozen,
    # in the policy's dtype and attention kernel, so the KL is exactly 0 at step 0. new_model()
    # builds it in that form; its weights are copied from the policy, or on resume from the
    # checkpoint. A pretrained model without warm-up is its own π0: new_model() already holds
    # those weights, and checkpoints leave them out (they reload from `source`).
    if resumed:
        pi0_weights = ckpt["ref_model"]  # None: π0 is `source` itself
    elif source == "scratch" or sft_total > 0:
        pi0_weights = gather_full(raw_model.state_dict())  # a collective under FSDP
    else:
        pi0_weights = None
    ref_in_ckpt = pi0_weights is not None
    ref_model = new_model()
    if ref_in_ckpt:
        ref_model.load_state_dict(pi0_weights)
    ref_scorer = SequenceScorer(ref_model.eval().requires_grad_(False))
    # under FSDP sharded like the policy (fp32, 1/world_size per GPU); otherwise a full copy
    if fsdp:
        fsdp_wrap(ref_scorer, device_type, bf16=device_type == "cuda")
    else:
        ref_model.to(device)

    # ---- optimizer as released: AdamW, linear decay to 0 over the budget, no warm-up, no clipping
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    if resumed:
        load_full_state_dicts(raw_model, optimizer, ckpt["model"], ckpt["optimizer"])
    n_prompts = latro_steps * batch_size
    log(f"LaTRO budget: {latro_steps} steps x {batch_size} prompts = {n_prompts} prompts "
        f"({n_prompts / len(train_ex):.2f} epochs of {len(train_ex)}), x K={rloo_k} = "
        f"{n_prompts * rloo_k} rollouts; per rank {prompts_per_rank} prompts, "
        f"{rollouts_per_rank} rollouts, {grad_accum} micro-steps of {micro_batch_size}")
    log_wandb = wandb_logger(wandb_log, master_process, wandb_project, wandb_run_name, config)

    def save(step, best_val_acc, before):
        """ckpt.pt at a LaTRO step, π0 included unless it reloads from `source`."""
        ref = ref_model if ref_in_ckpt else None
        save_state(optimizer, phase="latro", iter_num=step, best_val_acc=best_val_acc,
                   before=before, ref_model=ref)
        log(f"saved {ckpt_path} at step {step}")

    def evaluate_val(step, best_val_acc):
        """Model selection on the val split: best.pt holds the best weights so far. Returns the
        best val accuracy, this evaluation's included."""
        metrics = run_eval(val_ex)
        log(f"eval step {step} | val {format_metrics(metrics)}")
        if metrics["acc"] > best_val_acc:
            best_val_acc = metrics["acc"]
            weights_finite(f"saving best.pt at step {step}")
            model_sd = gather_full(raw_model.state_dict())
            if master_process:
                save_checkpoint(os.path.join(out_dir, "best.pt"), {"model": model_sd,
                                                                   "iter_num": step})
        log_wandb({f"val/{k}": v for k, v in metrics.items()}, step=step)
        return best_val_acc

    # π0 on the test split, with the same checker and metrics as after LaTRO; the warm-up's result
    # is saved first, so the long evaluations cannot lose it
    if before is None:
        save(iter_num, best_val_acc, before)
        before = run_eval(test_ex)
        log(f"before LaTRO | test {format_metrics(before)}")
        best_val_acc = evaluate_val(iter_num, best_val_acc)
        save(iter_num, best_val_acc, before)

    # ---- the LaTRO loop. One step: sample K rationales per prompt with the policy; score them
    # (policy and π0); rewards and RLOO advantages; one on-policy update over micro-batches; log.
    generator = torch.Generator(device=device)
    last_step = latro_steps  # stop_at_step ends this invocation early (resume continues it)
    if stop_at_step:
        last_step = min(latro_steps, stop_at_step)
    while iter_num < last_step:
        t0 = time.time()
        # the learning rate of this step: linear decay to 0, no warm-up (as released)
        lr = lr_at(iter_num, learning_rate, latro_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # rollouts: this rank's prompts, each K times (a group stays whole on one rank); rationales
        # sampled by the policy and cut before their first stop; the gold answer y after each.
        # The sampler's seed is a function of step and rank, so a resumed run draws the same.
        idx = rank_prompts(iter_num, batch_size, len(train_ex), seed, ddp_rank, ddp_world_size)
        xs = [train_x[i] for i in idx for _ in range(rloo_k)]
        ys = [train_y[i] for i in idx for _ in range(rloo_k)]
        generator.manual_seed(rollout_seed(seed, iter_num, ddp_rank))
        raw_model.eval()
        with gathered(train_scorer):  # FSDP: one all-gather per layer for the whole generate call
            zs, stopped, n_gen = sample(raw_model, xs, max_rationale_tokens, tok.pad_id,
                                        gen_batch_size, ctx, tok=tok, stop_ids=stop_ids,
                                        stop_strings=stops, temperature=temperature, top_p=top_p,
                                        generator=generator)
        t1 = time.time()

        # scoring without gradients: the policy's log π(z|x) and log π(y|x⊕z), π0's log π0(z|x),
        # over the same rows in the same shapes (so the KL is exactly 0 at step 0)
        logp_z, logp_y = score_rows(scorer, xs, zs, ys, tok.pad_id, micro_batch_size, ctx)
        ref_logp_z, _ = score_rows(ref_scorer, xs, zs, ys, tok.pad_id, micro_batch_size, ctx)

        # rewards r_ik = log π(y|x⊕z_ik) − β·KL_ik (non-stopped rationales penalised), and the
        # advantages A_ik = r_ik − mean_{j≠k} r_ij
        rewards, kl = latro_rewards(logp_y, logp_z, ref_logp_z, stopped.to(logp_y.device), rloo_k,
                                    beta, gamma, penalty)
        advantages = rloo_advantages(rewards, rloo_k)
        t2 = time.time()

        # update: one forward with gradients per micro-batch gives log π(z) (and log π(y|x⊕z) when
        # sft_coef > 0); DDP all-reduces the gradients on the last micro-step only
        raw_model.train()
        loss_sum = 0.0
        bad = torch.zeros(1)
        for j in range(grad_accum):
            s = slice(j * micro_batch_size, (j + 1) * micro_batch_size)
            ids, attn, z_mask, y_mask = build_batch(xs[s], zs[s], ys[s], tok.pad_id, device)
            # at sft_coef 0 (the released recipe) the answer needs no LM head and no backward
            if not sft_coef:
                y_mask = torch.zeros_like(y_mask)
            set_grad_sync(train_scorer, j == grad_accum - 1)
            with ctx:
                lz, ly = train_scorer(ids, attn, z_mask, y_mask)
            loss = latro_loss(lz, ly, advantages[s], sft_coef) / grad_accum
            loss.backward()
            loss_sum += loss.item()
            bad += not torch.isfinite(loss).item()
        # a nan/inf stops every rank together, before the update; ckpt.pt keeps the last good state
        if all_sum(bad + nonfinite_grads(model), device).item():
            finish(1, f"step {iter_num + 1}: the loss ({loss_sum}) or a gradient is nan/inf; "
                      f"stopping before the update. {ckpt_path} keeps the last good state (the "
                      f"last eval); resume from it with a lower learning_rate, or check the data")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        t3 = time.time()

        # log: means over all ranks' rollouts
        n = rollouts_per_rank * ddp_world_size
        sums = [rewards.sum().item(), kl.sum().item(), advantages.sum().item(),
                stopped.sum().item(), sum(map(len, zs)), loss_sum]
        stats = all_sum(torch.tensor(sums), device)
        reward_m, kl_m, adv_m, stop_m, len_m = (stats[:5] / n).tolist()
        loss_m = stats[5].item() / ddp_world_size
        times = (f"{1000 * (t3 - t0):.0f}ms (rollout {1000 * (t1 - t0):.0f} / score "
                 f"{1000 * (t2 - t1):.0f} / update {1000 * (t3 - t2):.0f})")
        log(f"step {iter_num}/{latro_steps} | reward {reward_m:.4f} | kl {kl_m:.4f} | adv "
            f"{adv_m:.1e} | stopped {100 * stop_m:.0f}% | len {len_m:.1f} | loss {loss_m:.4f} | "
            f"lr {lr:.2e} | tok/s {n_gen / (t1 - t0):.0f} | {times}")
        log_wandb({"reward": reward_m, "kl": kl_m, "stopped": stop_m, "len": len_m,
                   "loss": loss_m, "lr": lr}, step=iter_num)

        # model selection on val and a checkpoint, every eval_interval steps and at the end
        if iter_num % eval_interval == 0 or iter_num == latro_steps:
            best_val_acc = evaluate_val(iter_num, best_val_acc)
            save(iter_num, best_val_acc, before)
        # Ctrl-C / SIGTERM (on any rank): checkpoint (unless just done) and exit
        if stop.requested(device) and iter_num < latro_steps:
            if iter_num % eval_interval:
                save(iter_num, best_val_acc, before)
            signum = stop.signum or signal.SIGTERM  # (the signal may have reached another rank)
            finish(128 + signum, f"stopped by {signal.Signals(signum).name} at step {iter_num}; "
                                 f"continue with --init_from=resume")

    # a cheap check that DDP kept every rank's parameters identical
    if ddp and not fsdp:
        log(f"ddp: parameters identical on {ddp_world_size} ranks: {ranks_identical(model)}")
    if iter_num < latro_steps:
        save(iter_num, best_val_acc, before)
        log(f"stopped at step {iter_num} (stop_at_step); continue with --init_from=resume")
    else:
        # ---- final: test accuracy of the weights selected on val, the same checker as before
        if ddp:
            dist.barrier()  # rank 0 has written best.pt
        best = load_checkpoint(os.path.join(out_dir, "best.pt"))
        load_full_state_dicts(raw_model, None, best["model"])
        if best["iter_num"] == 0:  # step 0's weights are π0's: measured already
            after = before
        else:
            after = run_eval(test_ex)
        if latro_steps:
            log(f"before LaTRO | test {format_metrics(before)}")
            log(f"after LaTRO  | test {format_metrics(after)} (weights of step "
                f"{best['iter_num']}, best val {best_val_acc:.4f})")
        else:  # latro_steps=0: the SFT baseline alone
            log(f"SFT baseline | test {format_metrics(before)}")
        if export_hf:
            model_sd = gather_full(raw_model.state_dict())  # a collective under FSDP
            write_hf_export(raw_model, tok, model_sd, os.path.join(out_dir, "hf"), master_process)
    # leave the process group, the DDP wrapper first (model.end_distributed says why)
    train_scorer = None
    end_distributed()
