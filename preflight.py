"""
What both scripts check before any weight is loaded, once the data is tokenized: every kind of
sequence against the model's positions, the memory plan (bytes per GPU, or per process on the CPU,
refused when it cannot fit), and the free disk space for the checkpoints the run will write.

    n_params = preflight(hf_config, device, longest=..., memory=..., out_dir=...)
"""

import os
import shutil

import torch

from configurator import ConfigError, UserError
from model import max_positions, n_params_of_config
from parallel import print0

# -----------------------------------------------------------------------------
# the memory plan: per-GPU bytes before anything is loaded

GiB = 2 ** 30
PLAN_PARTS = ("weights", "grads", "optimizer", "reference", "gathered", "kv_cache", "activations")
OPTIMIZER_BYTES = {"adamw": 8, "none": 0}  # fp32 state per parameter: AdamW keeps two moments

def estimate_kv_cache_bytes(cfg, rows, tokens, dtype_bytes=2):
    """Bytes of the KV cache of `rows` sequences of `tokens` positions: keys and values of every
    layer, for the config's key/value heads (grouped-query attention keeps fewer than the query
    heads)."""
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * n_kv * head_dim * rows * tokens * dtype_bytes

def estimate_activation_bytes(cfg, tokens, *, logit_positions=0, checkpointing=False,
                              dtype_bytes=2):
    """Rough bytes saved for the backward of one micro-step over `tokens` positions (rows x length):
    ~17 activations of the hidden size per layer per token (Korthikanti et al. 2022, 34 bytes in
    16-bit; no attention matrix with SDPA/flash), or with activation checkpointing only each layer's
    input plus one layer being recomputed; plus the LM head's logits (16-bit) and their fp32
    log-softmax at the positions that are scored."""
    h, n_layer = cfg.hidden_size, cfg.num_hidden_layers
    per_layer = 17 * h * tokens * dtype_bytes
    if checkpointing:
        layers = n_layer * h * tokens * dtype_bytes + per_layer
    else:
        layers = n_layer * per_layer
    return layers + logit_positions * cfg.vocab_size * (dtype_bytes + 8)

def memory_plan(n_params, *, mode, world_size, precision, reference="none", optimizer="adamw",
                grad_accum=1, kv_cache_bytes=0, activations_bytes=0, device_bytes=None,
                training=True):
    """Estimated bytes per GPU. mode 'ddp' (every rank holds everything) or 'fsdp' (weights,
    gradients, optimizer state and a 'sharded' reference split over world_size); precision 'fp32'
    or 'bf16' (fp32 master weights, bf16 compute); reference: the frozen reference model, 'none',
    'full' (fp32 copy), 'sharded' (fp32, FSDP) or 'bf16'. Generation (gathered weights + KV cache)
    and the update (activations) do not overlap: the larger one counts. grad_accum > 1 means
    gradients synced on the last micro-step only: FSDP then holds full fp32 gradients in between
    (pass 1 when every micro-step syncs). Returns a dict of the parts, 'total', 'bytes_per_param'
    (of the persistent parts) and 'device'. training=False (an evaluation): no gradients, no
    optimizer state, no activations kept for a backward. (The keywords are the parts of the plan,
    one each.)"""
    if mode not in ("ddp", "fsdp"):
        raise ValueError(f"mode={mode!r}: use 'ddp' or 'fsdp'")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision!r}: use 'fp32' or 'bf16'")
    ref_bytes = {"none": 0, "full": 4, "sharded": 4 / world_size, "bf16": 2}
    if reference not in ref_bytes or (reference == "sharded" and mode != "fsdp"):
        raise ValueError(f"reference={reference!r}: use 'none', 'full', 'bf16' or (fsdp) 'sharded'")
    shard = world_size if mode == "fsdp" else 1
    compute = 2 if precision == "bf16" else 4
    grads = 4 / shard
    if mode == "ddp" and world_size > 1:
        grads += 4  # DDP's communication buckets: a second fp32 copy of the gradients
    if mode == "fsdp" and grad_accum > 1:
        grads += 4  # the non-syncing micro-steps accumulate each layer's full fp32 gradient
    if not training:
        grads, optimizer, activations_bytes = 0, "none", 0
    parts = dict(weights=4 / shard * n_params, grads=grads * n_params,
                 optimizer=OPTIMIZER_BYTES[optimizer] / shard * n_params,
                 reference=ref_bytes[reference] * n_params,
                 # an FSDP generate call gathers the whole model, in the compute dtype
                 gathered=(compute * n_params if mode == "fsdp" else 0), kv_cache=kv_cache_bytes,
                 activations=activations_bytes)
    persistent = parts["weights"] + parts["grads"] + parts["optimizer"] + parts["reference"]
    phase = max(parts["gathered"] + parts["kv_cache"], parts["activations"])
    plan = {k: int(v) for k, v in parts.items()}
    plan.update(total=int(persistent + phase), bytes_per_param=persistent / n_params,
                device=device_bytes, n_params=n_params, mode=mode, world_size=world_size)
    return plan

def device_memory_bytes(device):
    """Total memory of a CUDA device; on the CPU the host's memory shared by this host's ranks
    (torchrun's LOCAL_WORLD_SIZE)."""
    if not str(device).startswith("cuda"):
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return host // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return torch.cuda.get_device_properties(torch.device(device)).total_memory

def format_memory_plan(plan):
    """The plan as a few aligned lines for the start-up log."""
    one, many, per = "GPU", "GPUs", "GPU"
    if plan.get("host"):
        one, many, per = "CPU process", "CPU processes", "process"
    n = plan["n_params"]
    size = f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    where = f"{plan['world_size']} {one if plan['world_size'] == 1 else many}"
    head = (f"memory plan: {size} parameters, {plan['mode']} on {where}, "
            f"{plan['bytes_per_param']:.1f} bytes/parameter per {per} before generation and "
            f"activations")
    lines = [head]
    for k in PLAN_PARTS + ("total",):
        lines.append(f"  {k:<12}{plan[k] / GiB:7.2f} GiB")
    if plan["device"] is None:
        lines.append(f"  {'device':<12}  not checked (CPU)")
    else:
        host = " (the host's memory per process)" if plan.get("host") else ""
        lines.append(f"  {'device':<12}{plan['device'] / GiB:7.2f} GiB{host}")
    return "\n".join(lines)

def check_memory_plan(plan):
    """Raise ConfigError naming the fixes when the estimate exceeds the device (call it before
    loading)."""
    if plan["device"] is None or plan["total"] <= plan["device"]:
        return
    fixes = []
    if plan["mode"] == "ddp":
        fixes.append("--fsdp=True (shards weights, gradients and optimizer state over the GPUs)")
    fixes += ["more GPUs (under --fsdp=True each holds 1/world_size of the sharded state)",
              "--gradient_checkpointing=True (activations)",
              "a smaller micro-batch (micro_batch_size; gen_batch_size for the rollouts' KV cache)",
              "a smaller model (from scratch: block_size, n_layer, n_embd)"]
    unit, where = "GPU", "device's"
    if plan.get("host"):
        unit, where = "process", "host memory per process"
    raise ConfigError(f"estimated {plan['total'] / GiB:.1f} GiB per {unit} exceeds the {where} "
                      f"{plan['device'] / GiB:.1f} GiB:\n{format_memory_plan(plan)}\n"
                      f"fixes (any of):\n  " + "\n  ".join(fixes))

# -----------------------------------------------------------------------------
# the longest sequences of each script, as preflight's (tokens, what, how to shorten) triples

def coconut_longest(encoded, cur, *, layout, eval_prompts, stages, uniform_prob, max_new_tokens,
                    test_counts):
    """coconut.py's longest sequences (cur: its Curriculum; layout, eval_prompts: its functions): a
    training row at every stage it can be drawn at (with uniform_prob > 0 also 0..#steps of that
    row) and a val row at each stage run (the validation loss), and an evaluation prompt +
    max_new_tokens (the test at each thought count, val at each stage run)."""
    best = (0, None, None)
    for split, rows in (("training", encoded["train"]), ("val", encoded["val"])):
        for i, ex in enumerate(rows):
            drawn = set(stages)
            if uniform_prob > 0 and stages and split == "training":
                drawn |= set(range(len(ex[1]) + 1))
            for st in drawn:
                n = sum(map(len, layout(*ex, st, cur)))
                if n > best[0]:
                    best = (n, f"{split} example {i}", st)
    evals = [p for n in test_counts for p in eval_prompts(encoded["test"], cur.final_stage, cur, n)]
    evals += [p for st in stages for p in eval_prompts(encoded["val"], st, cur)]
    return [(best[0], f"{best[1]} at stage {best[2]}", "raise --block_size "
             "(scratch), lower max_latent_stage or c_thought, or drop long examples"),
            (max(map(len, evals), default=0) + max_new_tokens, f"the longest evaluation prompt "
             f"+ max_new_tokens={max_new_tokens}", "lower --max_new_tokens or raise --block_size "
             "(scratch)")]

def latro_longest(prompts, answers, gold, max_rationale_tokens, max_new_tokens):
    """latro.py's longest sequences: a rollout or evaluation (a prompt + its answer +
    max(max_rationale_tokens, max_new_tokens)) and a gold warm-up row (the whole [x, z*, y]; gold:
    token lists of prompt, rationale, answer)."""
    need = max(len(x) + len(y) for x, y in zip(prompts, answers))
    need += max(max_rationale_tokens, max_new_tokens)
    return [(need, "the longest rollout or evaluation (prompt + answer + max(max_rationale_tokens, "
             "max_new_tokens))", "raise block_size (scratch) or lower max_rationale_tokens / "
             "max_new_tokens"),
            (max((sum(map(len, row)) for row in gold), default=0), "the longest gold warm-up row",
             "raise block_size (scratch)")]


# -----------------------------------------------------------------------------
# coconut.py's stage schedule, printed before the run

def schedule_lines(cur, num_epochs, note=True):
    """coconut.py's plan: the stages of a run's epochs (cur: its Curriculum) as log lines, one per
    stage with its first and last epoch, and (note) a note when no epoch reaches the final stage,
    where model selection happens."""
    lines, first_stage, last_stage = [], cur.stage(0), cur.stage(num_epochs - 1)
    for st in cur.stages(num_epochs) if num_epochs > 0 else ():
        first = 0 if st == first_stage else (st - cur.start_stage) * cur.epochs_per_stage
        last = num_epochs - 1 if st == last_stage else first + cur.epochs_per_stage - 1
        replaced = "all" if st > cur.max_latent_stage else st
        lines.append(f"schedule: epochs {first}-{last} {cur.method} stage {st}: "
                     f"{cur.thoughts(st)} thoughts/pauses, "
                     f"{replaced if cur.final_stage else 'no'} steps replaced")
    if note and cur.final_stage > last_stage:
        lines.append(f"note: no epoch reaches the final stage {cur.final_stage}, so no best.pt: "
                     f"the last weights are tested")
    return "\n".join(lines)

def preflight(hf_cfg, device, *, longest, out_dir=None, extra_weights=0, **memory):
    """What both scripts check once the data is tokenized, before any weight is loaded: each kind
    of sequence against the model's positions (longest: (tokens, what it is, how to shorten it)
    triples), the memory plan (memory: plan_memory's keywords), printed, and refused when it
    cannot fit the device, and (out_dir given) the free disk space for the checkpoints
    (extra_weights: how many more weight files, epoch_N.pt, the run keeps). Returns the model's
    parameter count."""
    positions = max_positions(hf_cfg)
    for tokens, what, fix in longest:
        if positions and tokens > positions:
            raise UserError(f"{what} needs {tokens} positions but the model has {positions}: "
                            f"{fix}")
    n_params = plan_memory(hf_cfg, device, **memory)
    if out_dir is not None and int(os.environ.get("RANK", 0)) == 0:
        check_disk(out_dir, n_params, memory.get("reference", "none") != "none", extra_weights)
    return n_params

def check_disk(out_dir, n_params, with_reference, extra_weights=0):
    """Refuse a run whose checkpoints cannot fit out_dir's disk, before any work: ckpt.pt (fp32
    weights, AdamW's two moments, a reference model's weights) twice while it is replaced, plus
    best.pt's weights and extra_weights more weight files (epoch_N.pt)."""
    ckpt = n_params * (4 + 8 + (4 if with_reference else 0))
    need, free = 2 * ckpt + 4 * n_params * (1 + extra_weights), shutil.disk_usage(out_dir).free
    if free < need:
        kept = f", and {extra_weights} epoch_N.pt" if extra_weights else ""
        raise UserError(f"out_dir {out_dir!r} has {free / GiB:.2f} GiB free, but this run's "
                        f"checkpoints need about {need / GiB:.2f} GiB (ckpt.pt twice while it "
                        f"is replaced, best.pt{kept}): free space or choose another --out_dir")

def plan_memory(hf_cfg, device, *, fsdp, precision, grad_accum, reference="none", kv_cache,
                activations, training=True):
    """The memory plan of a run, printed, and refused before any weight is loaded when it cannot
    fit the device. kv_cache: (rows, tokens) of the largest generate call; activations: (tokens,
    logit positions, checkpointing) of one micro-step; training=False: an evaluation."""
    n_params = n_params_of_config(hf_cfg)
    unit = 2 if precision == "bf16" else 4                            # bytes per activation value
    kv = estimate_kv_cache_bytes(hf_cfg, *kv_cache, dtype_bytes=unit)
    tokens, logit_positions, checkpointing = activations
    acts = estimate_activation_bytes(hf_cfg, tokens, logit_positions=logit_positions,
                                     checkpointing=checkpointing, dtype_bytes=unit)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    plan = memory_plan(n_params, mode="fsdp" if fsdp else "ddp", world_size=world_size,
                       precision=precision, reference=reference, grad_accum=grad_accum,
                       kv_cache_bytes=kv, activations_bytes=acts,
                       device_bytes=device_memory_bytes(device), training=training)
    plan["host"] = not str(device).startswith("cuda")
    print0(format_memory_plan(plan))
    check_memory_plan(plan)
    return n_params
