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

import dataclasses
import math
import os
import sys
import time

import torch

from configurator import configure, each, exit_cleanly_on_user_error, system_rules
# (TASKS: what the RULES read)
from data import TASKS, check_shots_unseen, load_splits
from evaluate import CHECKERS, latro_correct, majority_correct
from formats import PROMPT_STYLES, encode_answers, encode_prompts, gold_rows, parse_stop_strings
from model import (Sampler, autocast_ctx, backbone, cut_at_stop, disable_dropout, load_model,
                   model_config, position_ids_from_mask, sample, scratch_config, token_logprobs)
from run import (StopRequest, all_sum, check_same_run, distribute, end_distributed, end_training,
                 enable_activation_checkpointing, exit_on_signal, gather_full, gathered, grad_norm,
                 load_best, load_full_state_dicts, preflight, print0, require_finite, resume_run,
                 save_hf_export, save_run, set_grad_sync, start, wandb_logger)
from vocab import build_tokenizer, tokenizer_name

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

CHOICES = {"arch": ("gpt2", "llama"), "penalty": ("group", "rank_mean", "none"),
           "checker": CHECKERS, "prompt": ("cot", "sft"), "eval_prompt": ("",) + PROMPT_STYLES,
           "arc_options": ("released", "lettered"), "answer_y": ("released", "clean"),
           "val_split": ("heldout", "test")}
# what a configuration must hold, checked by configurator.py before any work, in this order (names
# before numbers, the task before its options, so that a typo is reported as a typo)
RULES = [
    ("task in TASKS", "task={task!r} is unknown; {suggest(task, TASKS)}"),
    *each(" ".join(CHOICES), "{key} in CHOICES['{key}']",
          "{key}={value!r}: use one of {', '.join(map(repr, CHOICES['{key}']))}"),
    *system_rules("latro.py"),
    ("stop_strings == 'released' or not difflib.get_close_matches(stop_strings, ['released'], "
     "cutoff=0.75)", "stop_strings={stop_strings!r}: did you mean 'released'? (to stop at that "
     "text, write it as '{stop_strings}|' )"),
    ("all(s.strip() for s in parse_stop_strings(stop_strings))", "stop_strings={stop_strings!r} "
     "holds a blank stop string: it would cut every rationale at the first space; separate real "
     "strings with '|'"),
    ("not (pre_experiment and init_from in ('scratch', 'resume'))", "pre_experiment=True "
     "scores a trained model: give --init_from=<a save_pretrained directory, e.g. out/latro/hf>"),
    ("'8shot' not in (prompt, eval_prompt) or (task == 'gsm8k' and prompt != '8shot')",
     "the 8-shot prompt is GSM8K's, for evaluation: use --eval_prompt=8shot with --task=gsm8k"),
    ("eval_prompt != '8shot' or tokenizer_name(tokenizer, init_from) != 'words'",
     "eval_prompt=8shot needs a model's own tokenizer: the word vocabulary of a model from "
     "scratch does not hold the words of its eight worked examples"),
    ("init_from in ('scratch', 'resume') or not os.path.isfile(init_from)",
     "init_from={init_from!r} is a file; give a directory written by save_pretrained, a hub name, "
     "'scratch' or 'resume'"),
    *each("batch_size micro_batch_size gen_batch_size max_new_tokens eval_interval sft_batch_size "
          "sft_eval_interval learning_rate sft_learning_rate ddp_timeout gamma n_layer n_head "
          "n_embd block_size", "{key} > 0", "{key}={value}: give a value > 0"),
    *each("n_train n_val n_test", "{key} >= 0",
          "{key}={value}: give a value >= 0 (0 = the task's default size)"),
    *each("latro_steps sft_steps sft_epochs stop_at_step maj_k beta sft_coef weight_decay "
          "sft_target_acc", "{key} >= 0", "{key}={value}: give a value >= 0"),
    # rollouts that cannot teach: K equal rationales get equal rewards, so every advantage is 0
    ("temperature > 0", "temperature={temperature}: greedy rollouts make the K rationales of a "
     "prompt identical, so every RLOO advantage is 0 and LaTRO learns nothing; use > 0 (paper: 1)"),
    ("0 < top_p <= 1", "top_p={top_p}: use 0 < top_p <= 1 (1 = no nucleus, as in the paper); "
     "top_p -> 0 is greedy, whose identical rollouts give zero advantages"),
    ("max_rationale_tokens > 0", "max_rationale_tokens={max_rationale_tokens}: LaTRO optimises "
     "the rationale, so it needs at least one token (paper: 500)"),
    ("0 < sft_share <= 1",
     "sft_share={sft_share}: a share of the training questions, use a value in (0, 1]"),
    ("sft_target_acc <= 1", "sft_target_acc={sft_target_acc}: an accuracy, use a value in [0, 1] "
     "(0 = run all sft_steps)"),
    ("0 <= dropout < 1", "dropout={dropout}: use a value in [0, 1) (keep 0, see its comment)"),
    ("init_from != 'scratch' or n_embd % n_head == 0",
     "n_embd={n_embd} is not a multiple of n_head={n_head}"),
    # runs that would report an untrained model or contradict themselves
    ("init_from != 'scratch' or sft_steps or sft_epochs or latro_steps",
     "init_from='scratch' with no SFT warm-up (sft_steps=0) and latro_steps=0 trains nothing: the "
     "test accuracy would be a random model's; set sft_steps or latro_steps, or evaluate a "
     "trained model with evaluate.py"),
    ("not (init_from == 'resume' and overwrite)", "init_from='resume' continues out_dir's "
     "checkpoint and overwrite=True deletes it: choose one"),
    ("sft_batch_size % world_size == 0", "sft_batch_size={sft_batch_size} does not split over "
     "{world_size} ranks: make it a multiple of {world_size}"),
    # each rank owns whole groups of K (the leave-one-out baseline needs no other rank's rewards),
    # and every rank runs the same number of micro-steps (or DDP's backward hangs)
    ("rloo_k >= 2", "rloo_k={rloo_k}: the leave-one-out baseline needs at least 2 rationales per "
     "prompt"),
    ("batch_size % world_size == 0", "batch_size={batch_size} prompts per step do not split over "
     "{world_size} ranks: make batch_size a multiple of {world_size} or change the number of "
     "processes"),
    ("batch_size // world_size * rloo_k % micro_batch_size == 0",
     "each rank has {batch_size // world_size} prompts x rloo_k={rloo_k} = "
     "{batch_size // world_size * rloo_k} rollouts, which micro_batch_size={micro_batch_size} "
     "does not divide: pick a micro_batch_size dividing {batch_size // world_size * rloo_k}, or "
     "change batch_size / rloo_k"),
]
MODEL_KEYS = ("arch", "n_layer", "n_head", "n_embd", "block_size")  # a scratch model's shape
# what a resumed run must share with its checkpoint (+ MODEL_KEYS): the data, and what defines the
# objective and the update (latro_steps, intervals and evaluation settings may change)
RESUME_KEYS = ("task", "data_path", "split_layout", "n_train", "tokenizer", "seed", "prompt",
               "arc_options", "answer_y", "val_split", "batch_size", "rloo_k", "learning_rate",
               "beta", "gamma", "penalty", "sft_coef", "sft_learning_rate", "sft_batch_size")
# the keys' former names: an old name is refused with its new one
RENAMED = {"lr": "learning_rate", "sft_lr": "sft_learning_rate", "n_dev": "n_val",
           "ddp_timeout_s": "ddp_timeout", "eval_max_tokens": "max_new_tokens"}
if __name__ == "__main__":
    exit_cleanly_on_user_error()  # a UserError (a wrong key, file, value): one line, exit 1
    config = configure(globals(), sys.argv[1:], renamed=RENAMED, rules=RULES)

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
        positions = position_ids_from_mask(attention_mask)
        hidden = backbone(self.model)(input_ids=input_ids, attention_mask=attention_mask,
                                      use_cache=False, position_ids=positions).last_hidden_state
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
        set_grad_sync(scorer, j == n_micro - 1)
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
        set_grad_sync(scorer, j == len(starts) - 1)
        part = slice(s, s + micro_batch_size)
        with ctx:
            logp_z, logp_y = scorer(*build_batch(xs[part], zs[part], ys[part], pad_id, device))
        loss = -(logp_z + logp_y).sum() / n_tok
        loss.backward()
        total += loss.item()
    return total

# -----------------------------------------------------------------------------
# evaluation: greedy accuracy, maj@k and the answer's log-likelihood, with the released checker

@dataclasses.dataclass
class Evaluation:
    """How a split is scored, the same for val and test."""
    task: str
    style: str               # the prompt style (data.latro_prompt)
    arc_options: str
    checker: str             # evaluate.py's released or fixed checker
    stop_strings: list       # where the answer log-likelihood cuts the output
    max_new_tokens: int
    seed: int                # maj@k samples: seed + rank, the same at every evaluation
    sampler: Sampler         # outputs end at eos, pad or end-of-turn (no stop strings), as released
    answer_y: str = "released"  # the text of y (data.latro_answer)

@torch.no_grad()
def evaluate(model, wrapper, examples, maj_k, ev):
    """Greedy accuracy, maj@k and the mean log π(y | x, z_greedy) over a split, each rank scoring
    examples r, r+W, ... and the sums added over the ranks. The answer log-likelihood puts the gold
    answer after the greedy output cut at its first stop, as the reward does."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    mine, tok, how = examples[rank::world], ev.sampler.tok, ev.sampler
    xs = encode_prompts(tok, mine, ev.task, ev.arc_options, ev.style)
    device = next(model.parameters()).device
    model.eval()
    with gathered(wrapper):  # FSDP: weights gathered once for the whole split
        outs, _, _ = sample(model, xs, ev.max_new_tokens, how)
        texts = [tok.decode(o, cleanup=True) for o in outs]
        correct = sum(latro_correct(ev.task, t, ex, checker=ev.checker)
                      for t, ex in zip(texts, mine))
        cut = [o[:cut_at_stop(tok, o, how.stop_ids | {tok.pad_id}, ev.stop_strings)[0]]
               for o in outs]
        ys = encode_answers(tok, mine, ev.task, ev.answer_y)
        _, logp_y = score_rows(SequenceScorer(model), xs, cut, ys, tok.pad_id, how.chunk, how.ctx)
        maj = 0
        if maj_k:
            # a fixed seed: evaluations do not disturb training's random state
            g = torch.Generator(device=device).manual_seed(ev.seed + rank)
            many = [p for p in xs for _ in range(maj_k)]
            outs, _, _ = sample(model, many, ev.max_new_tokens, how, g, temperature=1.0)
            texts = [tok.decode(o, cleanup=True) for o in outs]
            maj = sum(majority_correct(ev.task, texts[i * maj_k:(i + 1) * maj_k], ex, ev.checker)
                      for i, ex in enumerate(mine))
    sums = all_sum(torch.tensor([correct, maj, logp_y.sum().item(), len(mine)],
                                dtype=torch.float64), device)
    correct, maj, answer_logp = (sums[:3] / sums[3]).tolist()
    if not maj_k:
        return {"acc": correct, "answer_logp": answer_logp}
    return {"acc": correct, f"maj@{maj_k}": maj, "answer_logp": answer_logp}

@torch.no_grad()
def answer_likelihoods(model, wrapper, examples, ev):
    """The paper's motivation (its Figure 2): does a good rationale raise the model's likelihood
    of the answer? The mean Σ log π(y | x) with no rationale, and Σ log π(y | x ⊕ z*) after the
    gold one, over the gold rows of `examples` (rank r scores r, r+W, ...), summed over the
    ranks."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    how, scorer = ev.sampler, SequenceScorer(model)
    xs, zs, ys = gold_rows(how.tok, examples[rank::world], ev.task, ev.arc_options, "cot",
                           ev.answer_y)
    model.eval()
    with gathered(wrapper):
        _, without = score_rows(scorer, xs, [[] for _ in xs], ys, how.pad_id, how.chunk, how.ctx)
        _, with_z = score_rows(scorer, xs, zs, ys, how.pad_id, how.chunk, how.ctx)
    sums = torch.tensor([without.sum().item(), with_z.sum().item(), len(xs)], dtype=torch.float64)
    sums = all_sum(sums, next(model.parameters()).device)
    return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()

def format_metrics(metrics):
    """'acc 0.5000 maj@8 0.6250 answer_logp -1.2345' for a log line."""
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())

# -----------------------------------------------------------------------------
# the run's small decisions, as functions the loop calls and the tests import

def batch_layout(batch_size, rloo_k, micro_batch_size, world_size):
    """Per-rank counts from the global ones (RULES make them divide): prompts per rank, rollouts per
    rank, gradient accumulation steps."""
    prompts = batch_size // world_size
    return prompts, prompts * rloo_k, prompts * rloo_k // micro_batch_size

def resume_keys(ckpt):
    """The config keys a resumed run must share with its checkpoint; a pretrained model's shape
    comes from its source, so the scratch shape keys apply to scratch runs only."""
    return (MODEL_KEYS if ckpt["source"] == "scratch" else ()) + RESUME_KEYS

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

def initial_model(source, n_vocab, shape, seed):
    """The initial weights: the same on every rank and every call (policy and π0); the global RNG
    is left as it was. Pretrained models get their dropout switched off, as released: rollouts,
    scoring and update see one function."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_model(source, n_vocab, **shape)
    if source != "scratch":
        disable_dropout(model)
    return model

def save_latro(path, run_info, model, optimizer, ref_model, iter_num, best_val_acc, before):
    """ckpt.pt at a LaTRO step: the weights and AdamW's state, where the run stands, the RNG, and
    π0's weights, gathered whole (a collective under FSDP); ref_model None: π0 reloads from the
    pretrained source."""
    ref_sd = None
    if ref_model is not None:
        ref_sd = gather_full(ref_model.state_dict())
    state = {**run_info, "phase": "latro", "iter_num": iter_num, "best_val_acc": best_val_acc,
             "before": before, "rng": torch.get_rng_state(), "ref_model": ref_sd}
    save_run(path, state, model, optimizer)
    print0(f"saved {path} at step {iter_num}")

def longest_sequences(prompts, answers, gold, max_rationale_tokens, max_new_tokens):
    """The longest sequences as preflight's (tokens, what, how to shorten) triples: a rollout or
    evaluation (a prompt + its answer + max(max_rationale_tokens, max_new_tokens)) and a gold
    warm-up row (the whole [x, z*, y]; gold: token lists of prompt, rationale, answer)."""
    need = max(len(x) + len(y) for x, y in zip(prompts, answers))
    need += max(max_rationale_tokens, max_new_tokens)
    return [(need, "the longest rollout or evaluation (prompt + answer + max(max_rationale_tokens, "
             "max_new_tokens))", "raise block_size (scratch) or lower max_rationale_tokens / "
             "max_new_tokens"),
            (max((sum(map(len, row)) for row in gold), default=0), "the longest gold warm-up row",
             "raise block_size (scratch)")]

# -----------------------------------------------------------------------------
if __name__ == "__main__":
    # ---- processes and device; rank 0 claims out_dir (a lock, no silent overwrite)
    ddp, ddp_rank, ddp_world_size, device = start(out_dir, device, ddp_timeout,
                                                  resume=init_from == "resume", overwrite=overwrite,
                                                  claim=not pre_experiment)
    # each rank owns whole groups of K and runs the same number of micro-steps
    prompts_per_rank, rollouts_per_rank, grad_accum = batch_layout(batch_size, rloo_k,
                                                                   micro_batch_size, ddp_world_size)
    device_type = torch.device(device).type
    ctx = autocast_ctx(device_type)  # bf16 on CUDA, fp32 on the CPU; log-probs are fp32 either way
    stop = StopRequest()  # Ctrl-C / SIGTERM: checkpoint at the next step boundary, then exit
    ckpt_path = os.path.join(out_dir, "ckpt.pt")

    # ---- resume: the checkpoint must be this script's, of this run; it says what the weights were
    # first loaded from, and the phase it was written in
    ckpt, source, phase = None, init_from, "sft"
    if init_from == "resume":
        ckpt = resume_run(out_dir, "latro")
        check_same_run(ckpt["config"], config, resume_keys(ckpt), RENAMED)
        source, phase = ckpt["source"], ckpt.get("phase", "latro")

    # ---- data: prompts x in the model's chat template, answers y = "The answer is {gold}." + eot
    splits = load_splits(task, (n_train, n_val, n_test), path=data_path, seed=seed,
                         split_layout=split_layout, allow_overlap=allow_split_overlap)
    train_ex, val_ex, test_ex = splits["train"], splits["val"], splits["test"]
    if eval_prompt == "8shot":  # its eight worked examples must not be scored
        check_shots_unseen(splits)
    if val_split == "test":  # the released protocol: GSM8K's val tail trains too, test selects
        if task == "gsm8k":
            train_ex = train_ex + val_ex
        val_ex = test_ex
        print0(f"val_split='test': model selection on the test split, as released (its accuracy "
               f"is then optimistic); {len(train_ex)} training questions")
    model_cfg = model_config(source) if source != "scratch" else None  # a wrong name fails here
    tok = build_tokenizer(tokenizer_name(tokenizer, source), train_ex + val_ex + test_ex)
    train_x = encode_prompts(tok, train_ex, task, arc_options, prompt)
    train_y = encode_answers(tok, train_ex, task, answer_y)
    stops = parse_stop_strings(stop_strings)
    print0(f"data: {task} train {len(train_ex)} val {len(val_ex)} test {len(test_ex)}, vocab "
           f"{len(tok)}, {len(stops)} stop strings, checker {checker}")
    # the warm-up's gold rows [x, z*, y]: a share of the training questions with their rationales;
    # the released SFT baseline (prompt=sft) trains one target text, then end-of-turn
    gold = train_ex[:max(1, int(sft_share * len(train_ex)))]
    gold_x, gold_z, gold_y = gold_rows(tok, gold, task, arc_options, prompt, answer_y)
    sft_total = sft_steps
    if sft_epochs > 0:
        sft_total = math.ceil(sft_epochs * len(gold) / sft_batch_size)

    # ---- the model's shape without its weights: positions for the longest sequence, memory plan
    shape = dict(arch=arch, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                 dropout=dropout, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    if source == "scratch":
        model_cfg = scratch_config(len(tok), **shape)
    shape.update(attn_implementation=attn_implementation, device_type=device_type)
    eval_ex = val_ex + test_ex
    longest = longest_sequences(
        train_x + encode_prompts(tok, eval_ex, task, arc_options, eval_prompt or prompt),
        train_y + encode_answers(tok, eval_ex, task, answer_y), list(zip(gold_x, gold_z, gold_y)),
        max_rationale_tokens, max_new_tokens)
    tokens = max(n for n, _, _ in longest)
    memory = dict(fsdp=fsdp, precision="bf16" if device_type == "cuda" else "fp32",
                  grad_accum=grad_accum, reference="sharded" if fsdp else "full",
                  kv_cache=(gen_batch_size, tokens),
                  activations=(micro_batch_size * tokens,
                               micro_batch_size * (max_rationale_tokens + 16),
                               gradient_checkpointing))
    n_params = preflight(model_cfg, device, longest, memory, None if pre_experiment else out_dir)

    # ---- model: the same seed on every rank (DDP also broadcasts rank 0's weights)
    model = initial_model(source, len(tok), shape, seed)
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    scorer = SequenceScorer(model)  # generation, evaluation and checkpoints use the model itself
    train_scorer = distribute(scorer, device, fsdp, bf16=True)         # (FSDP: in place)
    if ckpt:
        load_full_state_dicts(model, None, ckpt["model"])
        torch.set_rng_state(ckpt["rng"])
    else:
        torch.manual_seed(seed + ddp_rank)
    print0(f"model: {source}, {n_params / 1e6:.2f}M parameters, on {device}"
           f"{' (FSDP)' if fsdp else ''}")
    ends = {tok.eos_id, tok.pad_id, tok.end_of_turn_id}  # where outputs end, as released
    ev = Evaluation(task, eval_prompt or prompt, arc_options, checker, stops, max_new_tokens, seed,
                    Sampler(tok, ends, [], tok.pad_id, gen_batch_size, ctx, progress), answer_y)
    run_info = {"script": "latro", "config": config, "source": source}
    if pre_experiment:  # the paper's Figure 2 on this model, then exit
        gold_ex = [ex for ex in train_ex if ex["steps"]]
        without, with_z = answer_likelihoods(model, train_scorer, gold_ex, ev)
        print0(f"answer log-likelihood on {task} train gold rows: without a rationale {without:.4f}"
               f" | after the gold rationale {with_z:.4f} | difference {with_z - without:+.4f}")
        train_scorer = None                                            # (the wrapper goes first)
        end_distributed()
        sys.exit(0)

    # ---- the SFT warm-up on gold rows [x, z*, y], until val accuracy reaches sft_target_acc: a
    # scratch model learns the answer format here, so that LaTRO's rollouts can reach an answer at
    # all; with latro_steps=0 this is the SFT baseline
    if phase == "sft" and sft_total > 0:
        sft_optimizer = torch.optim.AdamW(model.parameters(), lr=sft_learning_rate,
                                          weight_decay=0.0)
        sft_start = 0
        if ckpt:  # a checkpoint written mid-warm-up
            load_full_state_dicts(model, sft_optimizer, ckpt["model"], ckpt["optimizer"])
            sft_start = ckpt["sft_iter"]
        print0(f"SFT warm-up: {len(gold)} gold rationales, up to {sft_total} steps of "
               f"{sft_batch_size} ({sft_total * sft_batch_size / len(gold):.2f} epochs), stop at "
               f"val accuracy {sft_target_acc}")
        t0 = time.time()
        for it in range(sft_start, sft_total + 1):
            if it % sft_eval_interval == 0 or it == sft_total:
                acc = evaluate(model, train_scorer, val_ex, 0, ev)["acc"]
                print0(f"sft {it}/{sft_total} | val acc {acc:.4f} | {time.time() - t0:.1f}s")
                if it == sft_total or 0 < sft_target_acc <= acc:
                    break
            if sft_decay:  # linear decay, no warm-up: the HF Trainer default the released SFT ran
                for group in sft_optimizer.param_groups:
                    group["lr"] = lr_at(it, sft_learning_rate, sft_total)
            # this rank's share of the step's gold rows; a token mean over that whole share
            idx = rank_prompts(it, sft_batch_size, len(gold_x), seed, ddp_rank, ddp_world_size)
            rows = ([gold_x[i] for i in idx], [gold_z[i] for i in idx], [gold_y[i] for i in idx])
            model.train()
            loss = sft_loss_backward(train_scorer, rows, micro_batch_size, tok.pad_id, ctx, device)
            require_finite(f"sft step {it}", all_sum(torch.tensor([loss]), device).item(),
                           grad_norm(model), ckpt_path)
            sft_optimizer.step()
            sft_optimizer.zero_grad(set_to_none=True)
            if stop.requested(device):  # Ctrl-C / SIGTERM on any rank: save this step, then exit
                save_run(ckpt_path, {**run_info, "rng": torch.get_rng_state(), "phase": "sft",
                                     "sft_iter": it + 1}, model, sft_optimizer)
                train_scorer = None                                    # (the wrapper goes first)
                exit_on_signal(stop, f"at sft step {it + 1}: {ckpt_path} saved")

    # ---- LaTRO. Where it stands: the step, the best val accuracy so far (model selection), and
    # `before`, the test metrics of π0 (measured once, printed again at the end)
    resumed = ckpt is not None and phase == "latro"
    iter_num, best_val_acc, before = 0, -1.0, None
    if resumed:  # (older checkpoints: best_dev_acc)
        iter_num, before = ckpt["iter_num"], ckpt["before"]
        best_val_acc = ckpt.get("best_val_acc", ckpt.get("best_dev_acc"))
    # the reference model π0: the policy as LaTRO starts (after the warm-up, if any), frozen, in the
    # policy's dtype and attention kernel, so the KL is exactly 0 at step 0. A pretrained model
    # without warm-up is its own π0: checkpoints leave it out (it reloads from `source`)
    pi0_weights = ckpt["ref_model"] if resumed else None
    if not resumed and (source == "scratch" or sft_total > 0):
        pi0_weights = gather_full(model.state_dict())                  # a collective under FSDP
    ref_model = initial_model(source, len(tok), shape, seed)
    saved_ref = None                                                   # what checkpoints hold of π0
    if pi0_weights is not None:
        ref_model.load_state_dict(pi0_weights)
        saved_ref, pi0_weights = ref_model, None
    ref_scorer = SequenceScorer(ref_model.eval().requires_grad_(False))
    distribute(ref_scorer, device, fsdp, bf16=True, frozen=True)       # FSDP: sharded like θ

    # ---- optimizer as released: AdamW, linear decay to 0 over the budget, no warm-up, no clipping
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    if resumed:
        load_full_state_dicts(model, optimizer, ckpt["model"], ckpt["optimizer"])
    ckpt = None                                                        # (frees its tensors)
    n_prompts = latro_steps * batch_size
    print0(f"LaTRO budget: {latro_steps} steps x {batch_size} prompts = {n_prompts} prompts "
           f"({n_prompts / len(train_ex):.2f} epochs of {len(train_ex)}), x K={rloo_k} = "
           f"{n_prompts * rloo_k} rollouts; per rank {prompts_per_rank} prompts, "
           f"{rollouts_per_rank} rollouts, {grad_accum} micro-steps of {micro_batch_size}")
    log_wandb = wandb_logger(wandb_log, wandb_project, wandb_run_name, config)
    rollouts = Sampler(tok, ends, stops, tok.pad_id, gen_batch_size, ctx)
    generator = torch.Generator(device=device)
    last_step = latro_steps  # stop_at_step ends this invocation early (resume continues it)
    if stop_at_step:
        last_step = min(latro_steps, stop_at_step)
    # π0 on the test split (with the checker and metrics of the end) and the first val selection;
    # the warm-up's result is saved first (step 0), so the long evaluations cannot lose it
    evaluating, stopping = before is None, False
    while True:
        # model selection on val and a checkpoint, at step 0, every eval_interval steps and at the
        # end; a checkpoint also when a signal or stop_at_step ends this run early
        if evaluating or stopping or iter_num == last_step:
            if before is None:
                save_latro(ckpt_path, run_info, model, optimizer, saved_ref, iter_num,
                           best_val_acc, None)
                before = evaluate(model, train_scorer, test_ex, maj_k, ev)
                print0(f"before LaTRO | test {format_metrics(before)}")
            if evaluating:
                metrics = evaluate(model, train_scorer, val_ex, maj_k, ev)
                print0(f"eval step {iter_num} | val {format_metrics(metrics)}")
                if metrics["acc"] > best_val_acc:
                    best_val_acc = metrics["acc"]
                    save_run(os.path.join(out_dir, "best.pt"), {"iter_num": iter_num}, model)
                log_wandb({f"val/{k}": v for k, v in metrics.items()}, step=iter_num)
            save_latro(ckpt_path, run_info, model, optimizer, saved_ref, iter_num, best_val_acc,
                       before)
        if stopping:  # Ctrl-C / SIGTERM on any rank: saved just above
            train_scorer = None                                        # (the wrapper goes first)
            exit_on_signal(stop, f"at step {iter_num}: {ckpt_path} saved")
        if iter_num >= last_step:
            break
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
        model.eval()
        with gathered(train_scorer):  # FSDP: one all-gather per layer for the whole generate call
            zs, stopped, n_gen = sample(model, xs, max_rationale_tokens, rollouts, generator,
                                        temperature=temperature, top_p=top_p)
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

        # update: the gradient of the surrogate latro_loss, micro-batch by micro-batch
        model.train()
        loss_sum = latro_backward(train_scorer, (xs, zs, ys), advantages, sft_coef,
                                  micro_batch_size, tok.pad_id, ctx, device)
        # means over all ranks' rollouts, for the log and the non-finite guard (every rank agrees)
        n = rollouts_per_rank * ddp_world_size
        sums = [rewards.sum().item(), kl.sum().item(), advantages.sum().item(),
                stopped.sum().item(), sum(map(len, zs)), loss_sum]
        stats = all_sum(torch.tensor(sums), device)
        reward_m, kl_m, adv_m, stop_m, len_m = (stats[:5] / n).tolist()
        loss_m = stats[5].item() / ddp_world_size
        # a nan/inf stops every rank together, before the update; ckpt.pt keeps the last good state
        require_finite(f"step {iter_num + 1}", loss_m, grad_norm(model), ckpt_path)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        t3 = time.time()
        print0(f"step {iter_num}/{latro_steps} | reward {reward_m:.4f} | kl {kl_m:.4f} | adv "
               f"{adv_m:.1e} | stopped {100 * stop_m:.0f}% | len {len_m:.1f} | loss {loss_m:.4f} | "
               f"lr {lr:.2e} | tok/s {n_gen / (t1 - t0):.0f} | {1000 * (t3 - t0):.0f}ms (rollout "
               f"{1000 * (t1 - t0):.0f} / score {1000 * (t2 - t1):.0f} / update "
               f"{1000 * (t3 - t2):.0f})")
        log_wandb({"reward": reward_m, "kl": kl_m, "stopped": stop_m, "len": len_m,
                   "loss": loss_m, "lr": lr}, step=iter_num)
        evaluating = iter_num % eval_interval == 0 or iter_num == latro_steps
        stopping = stop.requested(device) and iter_num < latro_steps
    end_training(stop, model, fsdp)  # the rest ends by itself: a signal now acts at once

    # ---- final: test accuracy of the weights selected on val, the same checker as before
    if iter_num < latro_steps:
        print0(f"stopped at step {iter_num} (stop_at_step); continue with --init_from=resume")
    else:
        best_step = load_best(model, out_dir)["iter_num"]
        after = before  # step 0's weights are π0's: measured already
        if best_step > 0:
            print0(f"testing the weights of step {best_step} on {len(test_ex)} questions")
            after = evaluate(model, train_scorer, test_ex, maj_k, ev)
        if latro_steps:
            print0(f"before LaTRO | test {format_metrics(before)}")
            print0(f"after LaTRO  | test {format_metrics(after)} (weights of step {best_step}, "
                   f"best val {best_val_acc:.4f})")
        else:  # latro_steps=0: the SFT baseline alone
            print0(f"SFT baseline | test {format_metrics(before)}")
        if export_hf:
            save_hf_export(model, tok, os.path.join(out_dir, "hf"))
    train_scorer = None                                                # (the wrapper goes first)
    end_distributed()
