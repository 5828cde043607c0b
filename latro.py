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

Read first: docs/walkthrough.md (every piece at the prompt). Launch:
    python latro.py                          # CPU demo: modsum, tiny model, SFT warm-up then LaTRO
    python latro.py --init_from=resume       # continue out_dir/ckpt.pt exactly
    torchrun --standalone --nproc_per_node=8 latro.py config/latro_gsm8k.py   # 8 GPUs, as the paper
The SFT baseline, one GPU, several nodes: docs/latro.md and docs/scaling.md.
"""

import math
import sys
import time

import torch

import configurator
import data
import formats
import metrics
import parallel
import preflight
import vocab
from configurator import UserError
from evaluate import CHECKERS
from metrics import format_metrics
from model import (Sampler, autocast_ctx, fresh_model, hidden_states, model_config,
                   position_ids_from_mask, sample, scratch_config, token_logprobs)
from parallel import print0
from run import Run

# -----------------------------------------------------------------------------
# configuration: the defaults are the CPU demo (minutes on 2 cores); paper values in comments
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
task = "modsum"                # modsum (CPU demo) | gsm8k | arc | a data.py task with an answer
data_path = ""                 # local file for gsm8k / arc / json; '' = generate or download
split_layout = ""              # one local file for all splits: 'tail:VAL,TEST' (data.load_task)
allow_split_overlap = False    # True: a question in two splits is a warning, not an error
n_train = 0                    # training questions (0 = the task's default size)
n_val = 200                    # val questions: evaluation during training and model selection
n_test = 500                   # test questions: scored before LaTRO and at the end, never to select
val_split = "heldout"          # select on: heldout (val) | test (released; GSM8K trains on 7,473)
tokenizer = ""                 # '' = word-level vocabulary for scratch models, else the model's own
prompt = "cot"                 # cot (LaTRO) | sft (the released SFT baseline's training prompt)
eval_prompt = ""               # '' = prompt | cot | sft_eval (released eval prompt of SFT models)
arc_options = "released"       # ARC options: released (a plain list of texts) | lettered ((A) text)
answer_y = "released"          # y's text: released (GSM8K's commas, ARC's '..' kept) | clean
# model (init_from='scratch')
arch = "gpt2"                  # gpt2 | llama
n_layer = 3                    # 3 x 128 dims, 4 heads: 0.63M parameters with the modsum vocabulary
n_head = 4                     # attention heads
n_embd = 128                   # width (hidden size)
block_size = 256               # longest sequence (positions) of a scratch model
dropout = 0.0                  # keep 0: the update must see the policy that made the rollouts
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
micro_batch_size = 64          # rollouts per forward/backward on one rank (paper: 4)
gen_batch_size = 256           # rows per generate call (rollouts and evaluation)
max_rationale_tokens = 40      # L, longest sampled rationale (paper: 500)
temperature = 1.0              # rollout sampling temperature (paper: 1)
top_p = 1.0                    # rollout nucleus (paper: 1, no top-p)
stop_strings = "released"      # 'released' (the 18 RELEASED_STOP_STRINGS) or 'A|B': found in text
beta = 0.05                    # KL coefficient (paper: 0.05 GSM8K, 0.25 ARC-Challenge)
gamma = 2.0                    # a non-stopped rationale's reward: gamma x mean raw (paper: 2)
penalty = "group"              # non-stopped penalty baseline: group | rank_mean (released) | none
sft_coef = 0.0                 # weight of ∇log π(y|x,z): 0 = released recipe, 1.0 = paper's Eq. 4
learning_rate = 1e-4           # AdamW peak, linear decay to 0, no warm-up (paper: 5e-7, pretrained)
weight_decay = 0.0             # (paper: 0)
# evaluation
checker = "released"           # released (as the paper's code: comparable numbers) | fixed
max_new_tokens = 64            # greedy / maj@k generation length: rationale + answer (paper: 500)
maj_k = 8                      # samples per question for maj@k (self-consistency), T=1; 0 = greedy
pre_experiment = False         # only score log π(y|x) and log π(y|x⊕z*) on gold rows (paper Fig. 2)
progress = True                # progress bars with an ETA for evaluations (rank 0, terminals only)
# system
device = "auto"                # auto | cpu | cuda
seed = 1337                    # data order, initial weights, rollouts (seeded by seed, step, rank)
fsdp = False                   # FSDP2: shard weights, gradients, optimizer state and π0
ddp_timeout = 1800             # seconds a rank waits in a collective (a dead peer) before it ends

# what each key may hold, checked before any work (the rules that tie keys: check_config)
CHOICES = {"task": data.TASKS, "arch": ("gpt2", "llama"), "penalty": ("group", "rank_mean", "none"),
           "checker": CHECKERS, "prompt": ("cot", "sft"), "val_split": ("heldout", "test"),
           "arc_options": ("released", "lettered"), "answer_y": ("released", "clean"),
           "eval_prompt": ("",) + formats.PROMPT_STYLES}
BOUNDS = {"batch_size micro_batch_size gen_batch_size max_new_tokens eval_interval sft_batch_size "
          "sft_eval_interval learning_rate sft_learning_rate ddp_timeout gamma n_layer n_head "
          "n_embd block_size": "> 0",
          "n_train n_val n_test latro_steps sft_steps sft_epochs stop_at_step maj_k beta sft_coef "
          "weight_decay": ">= 0", "sft_share": "(0, 1]",
          "sft_target_acc": "[0, 1]", "dropout": "[0, 1)"}
NOTES = {"sft_share": "a share of the training questions", "sft_target_acc": "an accuracy; 0 = run "
         "all sft_steps", "dropout": "keep 0, see its comment"}

# -----------------------------------------------------------------------------
# the method: rollouts (model.sample: cut at their first stop), one-pass scoring, rewards, RLOO,
# the loss

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
        embeds = self.model.get_input_embeddings()(input_ids)
        hidden = hidden_states(self.model, embeds, attention_mask,
                               position_ids_from_mask(attention_mask))
        # the hidden state at t predicts token t+1
        z_t, y_t = z_mask[:, 1:], y_mask[:, 1:]
        logp = token_logprobs(self.model, hidden[:, :-1], input_ids[:, 1:], z_t | y_t)  # (B, T-1)
        # (B,), (B,): sums over exactly the z tokens and exactly the y tokens
        return (logp * z_t).sum(1), (logp * y_t).sum(1)

@torch.no_grad()
def score_rows(scorer, prompts, rationales, answers, pad_id, chunk, ctx):
    """(Σ log π(z), Σ log π(y|x,z)) for every row, in right-sized chunks of `chunk` rows."""
    device = next(scorer.parameters()).device
    out = []
    for i in range(0, len(prompts), chunk):
        rows = (prompts[i:i + chunk], rationales[i:i + chunk], answers[i:i + chunk])
        with ctx:
            out.append(torch.stack(scorer(*build_batch(*rows, pad_id, device)), 1))
    logp = torch.cat(out)
    return logp[:, 0], logp[:, 1]

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
    elif penalty == "rank_mean":                                       # ('none': raw as it is)
        raw = torch.where(stopped, raw, gamma * raw.mean())
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

def latro_backward(scorer, rows, advantages, sft_coef, micro_batch_size, pad_id, ctx, device):
    """Back-propagate latro_loss over this rank's rollouts rows = (xs, zs, ys), one forward with
    gradients per micro-batch giving log π(z) (and log π(y|x⊕z) when sft_coef > 0); each
    micro-batch's loss is divided by their count, so the gradients add up to the mean's, and DDP
    all-reduces them on the last micro-step only. Returns the loss."""
    xs, zs, ys = rows
    n_micro = len(xs) // micro_batch_size
    total = 0.0
    for j in range(n_micro):
        part = slice(j * micro_batch_size, (j + 1) * micro_batch_size)
        ids, attn, z_mask, y_mask = build_batch(xs[part], zs[part], ys[part], pad_id, device)
        # at sft_coef 0 (the released recipe) the answer needs no LM head and no backward
        if not sft_coef:
            y_mask = torch.zeros_like(y_mask)
        parallel.set_grad_sync(scorer, j == n_micro - 1)
        with ctx:
            lz, ly = scorer(ids, attn, z_mask, y_mask)
        loss = latro_loss(lz, ly, advantages[part], sft_coef) / n_micro
        loss.backward()
        total += loss.item()
    return total

def sft_loss_backward(scorer, rows, micro_batch_size, pad_id, ctx, device):
    """The warm-up's supervised step on this rank's gold rows (xs, zs, ys) = [x, z*, y]: the NLL of
    z* and y, a mean per token over the whole share, back-propagated micro-batch by micro-batch (DDP
    all-reduces on the last). Returns the loss."""
    xs, zs, ys = rows
    n_tok = sum(len(z) + len(y) for z, y in zip(zs, ys))
    starts = range(0, len(xs), micro_batch_size)
    total = 0.0
    for j, s in enumerate(starts):
        parallel.set_grad_sync(scorer, j == len(starts) - 1)
        part = slice(s, s + micro_batch_size)
        with ctx:
            logp_z, logp_y = scorer(*build_batch(xs[part], zs[part], ys[part], pad_id, device))
        loss = -(logp_z + logp_y).sum() / n_tok
        loss.backward()
        total += loss.item()
    return total

def rollout_seed(seed, step, rank):
    """The seed of the rollout sampler at optimizer step `step` on a rank: a function of
    (seed, step, rank) only, so a resumed run draws the same rationales, every step draws new ones
    and every rank draws its own."""
    return seed + 1_000_003 * step + rank

def lr_at(step, lr, total_steps):
    """The learning rate of optimizer step `step` (0-based) of total_steps: linear decay from lr
    to 0, no warm-up, as released (the first step uses lr, the last lr / total_steps)."""
    return lr * (1 - step / total_steps)

# -----------------------------------------------------------------------------
# the rules that tie keys together (each key's own CHOICES and BOUNDS are checked first)

def check_config(c, world_size):
    """Called before any work with c.key = each key's value: the first rule broken is the error."""
    # rollouts that cannot teach: K equal rationales get equal rewards, so every advantage is 0
    if c.temperature <= 0:
        raise UserError(f"temperature={c.temperature}: greedy rollouts make the K rationales of a "
                        f"prompt identical, so every RLOO advantage is 0 and LaTRO learns nothing; "
                        f"use > 0 (paper: 1)")
    if not 0 < c.top_p <= 1:
        raise UserError(f"top_p={c.top_p}: use 0 < top_p <= 1 (1 = no nucleus, as in the paper); "
                        f"top_p -> 0 is greedy, whose identical rollouts give zero advantages")
    if c.rloo_k < 2:
        raise UserError(f"rloo_k={c.rloo_k}: the leave-one-out baseline needs at least 2 "
                        f"rationales per prompt")
    if c.max_rationale_tokens <= 0:
        raise UserError(f"max_rationale_tokens={c.max_rationale_tokens}: LaTRO optimises the "
                        f"rationale, so it needs at least one token (paper: 500)")
    # each rank owns whole groups of K (the leave-one-out baseline needs no other rank's rewards),
    # and every rank runs the same number of micro-steps (or DDP's backward hangs)
    if c.sft_batch_size % world_size:
        raise UserError(f"sft_batch_size={c.sft_batch_size} does not split over {world_size} "
                        f"ranks: make it a multiple of {world_size}")
    if c.batch_size % world_size:
        raise UserError(f"batch_size={c.batch_size} prompts per step do not split over "
                        f"{world_size} ranks: make batch_size a multiple of {world_size} or change "
                        f"the number of processes")
    rollouts = c.batch_size // world_size * c.rloo_k
    if rollouts % c.micro_batch_size:
        raise UserError(f"each rank has {c.batch_size // world_size} prompts x rloo_k={c.rloo_k} = "
                        f"{rollouts} rollouts, which micro_batch_size={c.micro_batch_size} does "
                        f"not divide: pick a micro_batch_size dividing {rollouts}, or change "
                        f"batch_size / rloo_k")

# -----------------------------------------------------------------------------
if __name__ == "__main__":
    config = configurator.configure(globals(), sys.argv[1:], choices=CHOICES, bounds=BOUNDS,
                                    notes=NOTES, check=check_config, renamed=configurator.RENAMED)
    # ---- processes, device, out_dir; resume: ckpt.pt says the model's source and the phase
    run = Run("latro", config, writes=not pre_experiment)
    device, ddp_rank, ddp_world_size = run.device, run.rank, run.world_size
    source = run.resumed("source", init_from)
    phase = run.ckpt.get("phase", "latro") if run.resuming else "sft"
    prompts_per_rank = batch_size // ddp_world_size  # whole groups of K, the same micro-steps
    grad_accum = prompts_per_rank * rloo_k // micro_batch_size
    precision = "bf16" if device.startswith("cuda") else "fp32"  # log-probs are fp32 either way
    ctx = autocast_ctx(torch.device(device).type, precision)

    # ---- data: prompts x in the model's chat template, answers y = "The answer is {gold}." + eot
    splits = data.load_splits(task, (n_train, n_val, n_test), path=data_path, seed=seed,
                              split_layout=split_layout, allow_overlap=allow_split_overlap)
    train_ex, val_ex, test_ex = data.selection_splits(splits, val_split, task, eval_prompt)
    model_cfg = model_config(source) if source != "scratch" else None  # a wrong name fails here
    tok = vocab.build_tokenizer(vocab.tokenizer_name(tokenizer, source),
                                train_ex + val_ex + test_ex,
                                saved_words=run.resumed("vocab", None))  # a checkpoint's own words
    vocab.check_no_special_text(tok, {"train": train_ex, "val": val_ex, "test": test_ex})
    run.agree("data", {"sizes": [len(train_ex), len(val_ex), len(test_ex)], "vocabulary": len(tok)})
    train_x = formats.encode_prompts(tok, train_ex, task, arc_options, prompt)
    train_y = formats.encode_answers(tok, train_ex, task, answer_y)
    stops = formats.parse_stop_strings(stop_strings)
    print0(f"data: {task} train {len(train_ex)} val {len(val_ex)} test {len(test_ex)}, vocab "
           f"{len(tok)}, {len(stops)} stop strings, checker {checker}")
    # the warm-up's gold rows [x, z*, y] (prompt=sft, the released SFT baseline: one target text)
    gold = train_ex[:max(1, int(sft_share * len(train_ex)))]
    gold_x, gold_z, gold_y = formats.gold_rows(tok, gold, task, arc_options, style=prompt,
                                                answer_y=answer_y)
    sft_total = math.ceil(sft_epochs * len(gold) / sft_batch_size) if sft_epochs else sft_steps

    # ---- the model's shape without its weights: positions for the longest sequence, memory plan
    shape = dict(arch=arch, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                 dropout=dropout, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    if source == "scratch":
        model_cfg = scratch_config(len(tok), **shape)
    shape.update(attn_implementation=attn_implementation, device_type=torch.device(device).type,
                 checkpointing=gradient_checkpointing)
    eval_x = formats.encode_prompts(tok, val_ex + test_ex, task, arc_options, eval_prompt or prompt)
    eval_y = formats.encode_answers(tok, val_ex + test_ex, task, answer_y)
    longest = preflight.latro_longest(train_x + eval_x, train_y + eval_y,
                                      list(zip(gold_x, gold_z, gold_y)),
                                      max_rationale_tokens=max_rationale_tokens,
                                      max_new_tokens=max_new_tokens)
    tokens = max(n for n, _, _ in longest)
    n_params = preflight.preflight(
        model_cfg, device, longest=longest, out_dir=None if pre_experiment else out_dir,
        fsdp=fsdp, precision=precision, grad_accum=grad_accum,
        reference="sharded" if fsdp else "full", kv_cache=(gen_batch_size, tokens),
        training=not pre_experiment and bool(sft_total or latro_steps),
        activations=(micro_batch_size * tokens, micro_batch_size * (max_rationale_tokens + 16),
                     gradient_checkpointing))

    # ---- model: the same seed on every rank (DDP also broadcasts rank 0's weights)
    model = fresh_model(source, len(tok), shape, seed)
    scorer = SequenceScorer(model)  # generation, evaluation and checkpoints use the model itself
    train_scorer = parallel.distribute(scorer, device, fsdp, bf16=True)  # (FSDP: in place)
    torch.manual_seed(seed + ddp_rank)
    if run.resuming:
        run.restore(model)                                             # and the RNG it saved
    print0(f"model: {source}, {n_params / 1e6:.2f}M parameters, on {device}{' (FSDP)' * fsdp}")
    # evaluations: outputs end at eos, pad or end-of-turn (no stop strings), as released; the
    # answer's log-likelihood comes from the method's own scorer
    ends = {tok.eos_id, tok.pad_id, tok.end_of_turn_id}
    ev = metrics.Evaluation(task=task, style=eval_prompt or prompt, arc_options=arc_options,
                            checker=checker, stop_strings=stops, max_new_tokens=max_new_tokens,
                            seed=seed, answer_y=answer_y, sampler=Sampler(
                                tok=tok, stop_ids=ends, stop_strings=[], pad_id=tok.pad_id,
                                chunk=gen_batch_size, ctx=ctx, progress=progress),
                            score=lambda m, *rows, **kw: score_rows(SequenceScorer(m), *rows, **kw))
    run.info.update(source=source, vocab=tok.word_list())
    if pre_experiment:  # the paper's Figure 2 on this model, then exit
        metrics.answer_likelihoods(model, train_scorer, [ex for ex in train_ex if ex["steps"]], ev)
        run.close()
        sys.exit(0)

    # ---- the SFT warm-up on gold rows [x, z*, y] until val accuracy reaches sft_target_acc: the
    # answer format, so that rollouts can reach an answer at all (latro_steps=0: the SFT baseline)
    if phase == "sft" and sft_total > 0:
        sft_optimizer = torch.optim.AdamW(model.parameters(), lr=sft_learning_rate,
                                          weight_decay=0.0)
        if run.resuming:  # a checkpoint written mid-warm-up
            run.restore(model, sft_optimizer)
        print0(f"SFT warm-up: {len(gold)} gold rationales, up to {sft_total} steps of "
               f"{sft_batch_size} ({sft_total * sft_batch_size / len(gold):.2f} epochs), stop at "
               f"val accuracy {sft_target_acc}")
        t0 = time.time()
        for it in range(run.resumed("sft_iter"), sft_total + 1):
            if it % sft_eval_interval == 0 or it == sft_total:
                acc = metrics.split_metrics(model, train_scorer, val_ex, 0, ev)["acc"]
                print0(f"sft {it}/{sft_total} | val acc {acc:.4f} | {time.time() - t0:.1f}s")
                run.log({"sft_val_acc": acc}, step=it)
                if it == sft_total or 0 < sft_target_acc <= acc:
                    break
            if sft_decay:  # linear decay, no warm-up: the HF Trainer default the released SFT ran
                for group in sft_optimizer.param_groups:
                    group["lr"] = lr_at(it, sft_learning_rate, sft_total)
            # this rank's share of the step's gold rows; a token mean over that whole share
            idx = parallel.rank_prompts(it, sft_batch_size, len(gold_x), seed, rank=ddp_rank,
                                        world_size=ddp_world_size)
            rows = ([gold_x[i] for i in idx], [gold_z[i] for i in idx], [gold_y[i] for i in idx])
            model.train()
            loss = sft_loss_backward(train_scorer, rows, micro_batch_size, pad_id=tok.pad_id,
                                     ctx=ctx, device=device)
            loss = parallel.all_sum(torch.tensor([loss]), device).item()
            run.require_finite(f"sft step {it}", loss, model)
            sft_optimizer.step()
            sft_optimizer.zero_grad(set_to_none=True)
            # Ctrl-C / SIGTERM on any rank: ckpt.pt of this step, then exit
            run.after_step(model, sft_optimizer, f"at sft step {it + 1}", phase="sft",
                           sft_iter=it + 1)

    # ---- π0: the policy as LaTRO starts, frozen, in its dtype and attention kernel (the KL is
    # exactly 0 at step 0); a pretrained model without warm-up is its own (checkpoints leave it out)
    resumed = run.resuming and phase == "latro"
    pi0 = run.ckpt["ref_model"] if resumed else None                   # resume: the saved π0
    if not resumed and (source == "scratch" or sft_total > 0):
        pi0 = parallel.gather_full(model.state_dict())                 # a collective under FSDP
    ref_model = fresh_model(source, len(tok), shape, seed, weights=pi0)
    ref_scorer = SequenceScorer(ref_model.eval().requires_grad_(False))
    parallel.distribute(ref_scorer, device, fsdp, bf16=True, frozen=True)  # FSDP: sharded like θ
    run.frozen["ref_model"] = ref_model if pi0 is not None else None   # what ckpt.pt holds of π0

    # ---- LaTRO: AdamW as released (linear decay to 0 over the budget, no warm-up, no clipping);
    # where it stands: the step, and `before`, π0's test metrics (measured once, printed at the end)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    if resumed:
        run.restore(model, optimizer)
    iter_num, before = run.ckpt["iter_num"] if resumed else 0, run.resumed("before", None)
    n_prompts = latro_steps * batch_size
    print0(f"LaTRO budget: {latro_steps} steps x {batch_size} prompts = {n_prompts} prompts "
           f"({n_prompts / len(train_ex):.2f} epochs of {len(train_ex)}), x K={rloo_k} = "
           f"{n_prompts * rloo_k} rollouts; per rank {prompts_per_rank} prompts, "
           f"{prompts_per_rank * rloo_k} rollouts, {grad_accum} micro-steps of {micro_batch_size}")
    # rationales end where outputs end (eos, pad, end-of-turn, as released) and at a stop string
    rollouts = Sampler(tok=tok, stop_ids=ends, stop_strings=stops, pad_id=tok.pad_id,
                       chunk=gen_batch_size, ctx=ctx)
    generator = torch.Generator(device=device)
    last_step = min(latro_steps, stop_at_step or latro_steps)  # stop_at_step: resume continues
    def select(step):  # model selection on val: printed, logged, best.pt when the best so far
        scores = metrics.split_metrics(model, train_scorer, val_ex, maj_k, ev)
        print0(f"eval step {step} | val {format_metrics(scores)}")
        run.keep_best(scores["acc"], model, iter_num=step)
        run.log({f"val/{k}": v for k, v in scores.items()}, step=step)
    if before is None:  # step 0: the warm-up's result saved first, then π0 on test and on val
        run.save(model, optimizer, announce=True, phase="latro", iter_num=0, before=None)
        before = metrics.split_metrics(model, train_scorer, test_ex, maj_k, ev)
        print0(f"before LaTRO | test {format_metrics(before)}")
        select(0)
        run.save(model, optimizer, announce=True, phase="latro", iter_num=0, before=before)
    for step in range(iter_num, last_step):
        t0 = time.time()
        # the learning rate of this step: linear decay to 0, no warm-up (as released)
        lr = lr_at(step, learning_rate, latro_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # rollouts: this rank's prompts, each K times (a group stays whole on one rank); rationales
        # sampled by the policy and cut before their first stop; the gold answer y after each.
        # The sampler's seed is a function of step and rank, so a resumed run draws the same.
        idx = parallel.rank_prompts(step, batch_size, len(train_ex), seed, rank=ddp_rank,
                                    world_size=ddp_world_size)
        xs = [train_x[i] for i in idx for _ in range(rloo_k)]
        ys = [train_y[i] for i in idx for _ in range(rloo_k)]
        generator.manual_seed(rollout_seed(seed, step, ddp_rank))
        model.eval()
        with parallel.gathered(train_scorer):  # FSDP: one all-gather per layer for the whole call
            zs, stopped, n_gen = sample(model, xs, max_rationale_tokens, rollouts, generator,
                                        temperature=temperature, top_p=top_p)
        t1 = time.time()

        # scoring without gradients: the policy's log π(z|x) and log π(y|x⊕z), π0's log π0(z|x),
        # over the same rows in the same shapes (so the KL is exactly 0 at step 0)
        logp_z, logp_y = score_rows(scorer, xs, zs, ys, pad_id=tok.pad_id,
                                    chunk=micro_batch_size, ctx=ctx)
        ref_logp_z, _ = score_rows(ref_scorer, xs, zs, ys, pad_id=tok.pad_id,
                                   chunk=micro_batch_size, ctx=ctx)

        # rewards r_ik = log π(y|x⊕z_ik) − β·KL_ik (non-stopped rationales penalised), and the
        # advantages A_ik = r_ik − mean_{j≠k} r_ij
        rewards, kl = latro_rewards(logp_y, logp_z, ref_logp_z, stopped.to(logp_y.device),
                                    rloo_k=rloo_k, beta=beta, gamma=gamma, penalty=penalty)
        advantages = rloo_advantages(rewards, rloo_k)
        t2 = time.time()

        # update: the gradient of the surrogate latro_loss, micro-batch by micro-batch
        model.train()
        loss_sum = latro_backward(train_scorer, (xs, zs, ys), advantages, sft_coef,
                                  micro_batch_size=micro_batch_size, pad_id=tok.pad_id, ctx=ctx,
                                  device=device)
        # means over all ranks' rollouts, for the log and the non-finite guard (every rank agrees);
        # a group none of whose rationales stopped gets equal raw rewards (γ x its mean): its
        # advantages are only the KL's differences, about 0, so it teaches nothing this step
        n = prompts_per_rank * rloo_k * ddp_world_size
        no_stop = (~stopped.view(-1, rloo_k)).all(1).sum().item()
        sums = [rewards.sum().item(), kl.sum().item(), advantages.sum().item(),
                stopped.sum().item(), sum(map(len, zs)), loss_sum, no_stop]
        stats = parallel.all_sum(torch.tensor(sums), device)
        reward_m, kl_m, adv_m, stop_m, len_m = (stats[:5] / n).tolist()
        loss_m, no_stop = stats[5].item() / ddp_world_size, int(stats[6].item())
        # a nan/inf stops every rank together, before the update; ckpt.pt keeps the last good state
        run.require_finite(f"step {step + 1}", loss_m, model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iter_num = step + 1
        t3 = time.time()
        stuck = f" (no stop in {no_stop}/{batch_size} groups)" if no_stop else ""
        print0(f"step {iter_num}/{latro_steps} | reward {reward_m:.4f} | kl {kl_m:.4f} | adv "
               f"{adv_m:.1e} | stopped {100 * stop_m:.0f}%{stuck} | len {len_m:.1f} | loss "
               f"{loss_m:.4f} | lr {lr:.2e} | tok/s {n_gen / (t1 - t0):.0f} | "
               f"{1000 * (t3 - t0):.0f}ms (rollout {1000 * (t1 - t0):.0f} / score "
               f"{1000 * (t2 - t1):.0f} / update {1000 * (t3 - t2):.0f})")
        run.log({"reward": reward_m, "kl": kl_m, "stopped": stop_m, "len": len_m, "loss": loss_m,
                 "lr": lr, "no_stop_groups": no_stop}, step=iter_num)
        # model selection on val every eval_interval steps and at the end
        evaluating = iter_num % eval_interval == 0 or iter_num == latro_steps
        if evaluating:
            select(iter_num)
        # ckpt.pt at each evaluation and where this run stops; Ctrl-C / SIGTERM: ckpt.pt, then exit
        run.after_step(model, optimizer, f"at step {iter_num}", save=evaluating or
                       iter_num == last_step, announce=True, phase="latro", iter_num=iter_num,
                       before=before)
    run.end(model)  # the rest ends by itself: a signal now acts at once

    # ---- final: test accuracy of the weights selected on val, the same checker as before
    if iter_num < latro_steps:
        print0(f"stopped at step {iter_num} (stop_at_step); continue with --init_from=resume")
    else:
        best_step = run.load_best(model)["iter_num"]
        after = before  # step 0's weights are π0's: measured already
        if best_step > 0:
            print0(f"testing the weights of step {best_step} on {len(test_ex)} questions")
            after = metrics.split_metrics(model, train_scorer, test_ex, maj_k, ev)
        stuck = sum(1 for n in run.logged("no_stop_groups") if n)
        if stuck:
            print0(f"{stuck} of {latro_steps} steps had a group in which no rationale stopped (its "
                   f"advantages about 0): a longer max_rationale_tokens lets more of them stop")
        if latro_steps:
            print0(f"before LaTRO | test {format_metrics(before)}")
            print0(f"after LaTRO  | test {format_metrics(after)} (weights of step {best_step}, "
                   f"best val {run.best:.4f})")
        else:  # latro_steps=0: the SFT baseline alone, or (no warm-up either) the model as loaded
            label = "SFT baseline" if sft_total else "no training"
            print0(f"{label} | test {format_metrics(before)}")
        if export_hf:
            run.export(model, tok)
    run.close()
