"""
The evaluations both scripts run during and after training, over the ranks: rank r scores examples
r, r+W, ... of a split (each exactly once) and the counts and sums are added over the ranks, so one
process and eight print the same numbers. The method's own pieces come in as arguments (Coconut's
generate_answers, LaTRO's scorer): this module knows how to batch, decode, check and count.

    acc, tokens, texts = greedy_accuracy(model, wrapper, prompts, golds, dec)   # coconut.py
    loss = validation_loss(wrapper, batches, dec)                              # coconut.py
    metrics = split_metrics(model, wrapper, examples, maj_k, ev)               # latro.py
"""

import dataclasses
import os

import torch

import formats
import parallel
from evaluate import coconut_correct, latro_correct, majority_correct
from model import Sampler, cut_at_stop, progress_bar, sample
from parallel import print0

# -----------------------------------------------------------------------------
# Coconut: greedy accuracy with the thoughts, the validation loss at the epoch's layout

@dataclasses.dataclass
class Decoding:
    """How Coconut's evaluations decode, the same for every split."""
    tok: object              # vocab.Tokenizer
    latent_id: int           # the thought fed back (None: a plain LM)
    batch_size: int          # prompts per generate call
    max_new_tokens: int
    ctx: object              # autocast (or nullcontext)
    device: str
    progress: bool = False   # a progress bar over the generate calls (rank 0, terminals only)
    generate: object = None  # coconut.generate_answers: the latent prefix, then greedy decoding

def greedy_accuracy(model, wrapper, prompts, golds, dec):
    """(accuracy, mean tokens generated with thoughts, this rank's texts) over all ranks: exact
    match of the text after the last '#' (evaluate.coconut_correct). FSDP: the weights are gathered
    once for the whole call, so ranks may run different numbers of forwards."""
    n_correct, n_tokens, texts, tok, step = 0, 0, [], dec.tok, dec.batch_size
    model.eval()
    with dec.ctx, parallel.gathered(wrapper):
        for i in progress_bar(range(0, len(prompts), step), dec.progress, "evaluating"):
            batch, answers = prompts[i:i + step], golds[i:i + step]
            tokens, n_gen = dec.generate(model, batch, dec.latent_id, eos_id=tok.eos_id,
                                         pad_id=tok.pad_id, max_new_tokens=dec.max_new_tokens,
                                         device=dec.device)
            for row, n, prompt, gold in zip(tokens.tolist(), n_gen.tolist(), batch, answers):
                texts.append(tok.decode(row[:n]))
                n_correct += coconut_correct(texts[-1], gold)
                n_tokens += n + prompt.count(dec.latent_id)            # the paper counts thoughts
    model.train()
    acc, mean_tokens = parallel.mean_over_ranks([n_correct, n_tokens], len(prompts), dec.device)
    return acc, mean_tokens, texts

@torch.no_grad()
def validation_loss(wrapper, batches, dec):
    """Mean next-token loss per labelled token over this rank's collated batches (input_ids,
    attention_mask, labels), over all ranks (the released code prints it each epoch). The forward
    is the Coconut module's inside a DDP wrapper (a DDP forward expects a backward); FSDP shards the
    module itself."""
    coconut_model = getattr(wrapper, "module", wrapper)
    total, count = 0.0, 0
    coconut_model.model.eval()
    with parallel.gathered(wrapper):
        for batch in batches:
            ids, mask, labels = (t.to(dec.device) for t in batch)
            n = (labels[:, 1:] != -100).sum().item()
            with dec.ctx:
                total += coconut_model(ids, mask, labels).item() * n   # (a mean over n tokens)
            count += n
    coconut_model.model.train()
    return parallel.mean_over_ranks([total], count, dec.device)[0]

# -----------------------------------------------------------------------------
# LaTRO: greedy accuracy, maj@k and the answer's log-likelihood, with the released checker

@dataclasses.dataclass
class Evaluation:
    """How LaTRO scores a split, the same for val and test."""
    task: str
    style: str               # the prompt style (formats.latro_prompt)
    arc_options: str
    checker: str             # evaluate.py's released or fixed checker
    stop_strings: list       # where the answer log-likelihood cuts the output
    max_new_tokens: int
    seed: int                # maj@k samples: seed + rank, the same at every evaluation
    sampler: Sampler         # outputs end at eos, pad or end-of-turn (no stop strings), as released
    answer_y: str = "released"  # the text of y (formats.latro_answer)
    score: object = None     # latro.score_rows on a model: (Σ log π(z|x), Σ log π(y|x⊕z)) per row

def shard(examples):
    """This rank's examples r, r+W, ... of a split."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return examples[rank::world]

@torch.no_grad()
def split_metrics(model, wrapper, examples, maj_k, ev):
    """Greedy accuracy, maj@k and the mean log π(y | x, z_greedy) over a split, each rank scoring
    examples r, r+W, ... and the sums added over the ranks. The answer log-likelihood puts the gold
    answer after the greedy output cut at its first stop, as the reward does."""
    mine, tok, how = shard(examples), ev.sampler.tok, ev.sampler
    xs = formats.encode_prompts(tok, mine, ev.task, ev.arc_options, ev.style)
    device = next(model.parameters()).device
    model.eval()
    with parallel.gathered(wrapper):  # FSDP: weights gathered once for the whole split
        outs, _, _ = sample(model, xs, ev.max_new_tokens, how)
        texts = [tok.decode(o, cleanup=True) for o in outs]
        correct = sum(latro_correct(ev.task, t, ex, checker=ev.checker)
                      for t, ex in zip(texts, mine))
        cut = [o[:cut_at_stop(tok, o, how.stop_ids | {tok.pad_id}, ev.stop_strings)[0]]
               for o in outs]
        ys = formats.encode_answers(tok, mine, ev.task, ev.answer_y)
        _, logp_y = ev.score(model, xs, cut, ys, pad_id=how.pad_id, chunk=how.chunk, ctx=how.ctx)
        maj = 0
        if maj_k:
            # a fixed seed: evaluations do not disturb training's random state
            rank = int(os.environ.get("RANK", 0))
            g = torch.Generator(device=device).manual_seed(ev.seed + rank)
            many = [p for p in xs for _ in range(maj_k)]
            outs, _, _ = sample(model, many, ev.max_new_tokens, how, g, temperature=1.0)
            texts = [tok.decode(o, cleanup=True) for o in outs]
            maj = sum(majority_correct(ev.task, texts[i * maj_k:(i + 1) * maj_k], ex, ev.checker)
                      for i, ex in enumerate(mine))
    acc, maj, answer_logp = parallel.mean_over_ranks([correct, maj, logp_y.sum().item()],
                                                     len(mine), device)
    if not maj_k:
        return {"acc": acc, "answer_logp": answer_logp}
    return {"acc": acc, f"maj@{maj_k}": maj, "answer_logp": answer_logp}

@torch.no_grad()
def answer_likelihoods(model, wrapper, examples, ev):
    """The paper's motivation (its Figure 2): does a good rationale raise the model's likelihood
    of the answer? The mean Σ log π(y | x) with no rationale, and Σ log π(y | x ⊕ z*) after the
    gold one, over the gold rows of `examples` (rank r scores r, r+W, ...), over all ranks;
    printed, and returned."""
    how = ev.sampler
    xs, zs, ys = formats.gold_rows(how.tok, shard(examples), ev.task, ev.arc_options, style="cot",
                                   answer_y=ev.answer_y)
    model.eval()
    with parallel.gathered(wrapper):
        _, without = ev.score(model, xs, [[] for _ in xs], ys, pad_id=how.pad_id, chunk=how.chunk,
                              ctx=how.ctx)
        _, with_z = ev.score(model, xs, zs, ys, pad_id=how.pad_id, chunk=how.chunk, ctx=how.ctx)
    device = next(model.parameters()).device
    without, with_z = parallel.mean_over_ranks([without.sum().item(), with_z.sum().item()], len(xs),
                                               device)
    print0(f"answer log-likelihood on {ev.task} train gold rows: without a rationale {without:.4f}"
           f" | after the gold rationale {with_z:.4f} | difference {with_z - without:+.4f}")
    return without, with_z

def format_metrics(metrics):
    """'acc 0.5000 maj@8 0.6250 answer_logp -1.2345' for a log line."""
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
