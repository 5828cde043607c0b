"""
The processes of a run and how a model is spread over them: torchrun's process group (NCCL on
CUDA, gloo on the CPU), rank-0 printing, sums over the ranks, and the wrappers: DDP, or FSDP2
(`fully_shard` per decoder layer) with what a training script needs around it (generating with
the weights gathered once, gradient accumulation, checkpoints gathered whole and loaded back into
shards).

    ddp_rank, ddp_world_size, device = start(device, timeout)   # run.Run calls it
    train_model = distribute(Wrapper(model), device, fsdp)      # DDP, FSDP2 or as it is
    set_grad_sync(train_model, last_micro_step)                 # before each micro-step
    with gathered(train_model): ... generate ...                # FSDP: one all-gather per layer
"""

import datetime
import gc
import os
import weakref
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------------------------------------------------------
# processes and device

def print0(*args):
    """print on rank 0 only (torchrun gives every process its RANK; a plain run is rank 0)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args)


def start(device, timeout):
    """Under torchrun: the process group (NCCL on CUDA, gloo on the CPU; a dead peer ends it after
    `timeout` seconds) and this rank's GPU. Returns ddp_rank, ddp_world_size, device ('auto'
    resolved)."""
    ddp_rank = int(os.environ.get("RANK", 0))
    ddp_world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" in os.environ:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    return ddp_rank, ddp_world_size, device

def distributed():
    """True inside a torchrun launch once init_process_group has run."""
    return dist.is_available() and dist.is_initialized()


# the DDP wrappers of this process: end_distributed() frees their communication state
_DDP_WRAPPERS = weakref.WeakSet()

def distribute(module, device, fsdp=False, bf16=False, frozen=False):
    """The module the training step calls: sharded in place with FSDP2 (fsdp=True, fsdp_wrap), or
    moved to the device and, under torchrun, wrapped in DDP; a plain run gets it as it is. frozen:
    a module without gradients (a reference model) needs no DDP wrapper."""
    device_type = torch.device(device).type
    if fsdp:  # bf16 compute copies on CUDA only
        return fsdp_wrap(module, device_type, bf16=bf16 and device_type == "cuda")
    module.to(device)
    if frozen or not distributed():
        return module
    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    wrapper = DDP(module, device_ids=device_ids)
    _DDP_WRAPPERS.add(wrapper)
    return wrapper

def all_sum(t, device="cpu"):
    """A small tensor summed over the ranks (eval counts, logged stats, NaN flags), returned on the
    CPU. device: where the collective runs (NCCL takes CUDA tensors). Without a process group: t."""
    if distributed():
        t = t.to(device)
        dist.all_reduce(t)
    return t.cpu()

def mean_over_ranks(sums, count, device="cpu"):
    """Means over every rank's items: each rank's `sums` (a list of numbers) and its item count are
    added over the ranks (float64), then each sum is divided by the total count."""
    total = all_sum(torch.tensor([*sums, count], dtype=torch.float64), device)
    return (total[:-1] / total[-1].clamp(min=1)).tolist()

def max_over_ranks(values, device="cpu"):
    """Each of a list of integers, maxed over the ranks (as is without a process group)."""
    t = torch.tensor(values, device=device)
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()

def aligned_columns(rows, latent_id, feedback_id, device, fsdp):
    """coconut.py under FSDP: every pass all-gathers each layer, so every rank must run the same
    passes even when its rows hold fewer thoughts. The max over the ranks of the anchor column, the
    length after it and the thought count: every rank then lays its micro-batch out alike and splits
    at the same columns. Returns (c0, width, cols) for collate() and the forward; Nones without
    FSDP."""
    if not fsdp:
        return None, None, None
    anchors = [p.index(latent_id) if latent_id in p else len(p) for p, _ in rows]
    n = max(p.count(feedback_id) for p, _ in rows) if feedback_id is not None else 0
    after = max(len(p) + len(t) - a for (p, t), a in zip(rows, anchors))
    c0, after, n = max_over_ranks([max(anchors), after, n], device)
    return c0, c0 + after, list(range(c0, c0 + n))

def rank_block(batch, rank, micro, grad_accum, micro_batch_size):
    """This rank's examples at this micro-step: the global batch is cut into world x grad_accum
    blocks, rank r takes blocks r*grad_accum .. (r+1)*grad_accum-1, so 2 ranks x 1 micro-step == 1
    process x 2 micro-steps."""
    at = (rank * grad_accum + micro) * micro_batch_size
    return batch[at:at + micro_batch_size]

def step_indices(step, n_per_step, n_data, seed):
    """The questions of one step: consecutive slices of one seeded permutation per epoch (so resume
    is exact)."""
    first = step * n_per_step
    perms = [torch.randperm(n_data, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
             for epoch in range(first // n_data, (first + n_per_step - 1) // n_data + 1)]
    start = first % n_data
    return sum(perms, [])[start:start + n_per_step]

def rank_prompts(step, batch_size, n_data, seed, rank=0, world_size=1):
    """The questions this rank rolls out at a step: its contiguous share of the step's batch_size
    questions (step_indices). The ranks' shares are disjoint and together are exactly the questions
    a single process takes at that step."""
    per_rank = batch_size // world_size
    return step_indices(step, batch_size, n_data, seed)[rank * per_rank:(rank + 1) * per_rank]

def ranks_identical(model):
    """Does every rank hold the same weights? (a cheap check after DDP training, a collective): each
    tensor's sum and sum of squares, in float64, must have the same min and max over the ranks."""
    p = [w.detach().double() for w in model.parameters()]
    sums = torch.stack([torch.stack([w.sum(), w.square().sum()]) for w in p])
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def end_distributed():
    """Leave the process group on every rank together. The DDP wrappers' reducers (which hold the
    group's buffers and threads) go first: a group torn down under a live reducer can abort the
    process at exit ('terminate called without an active exception')."""
    if distributed():
        for wrapper in list(_DDP_WRAPPERS):
            wrapper.__dict__.pop("reducer", None)
            wrapper.__dict__.pop("logger", None)
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()

def grad_norm(model):
    """The global gradient norm (after the sync: the same on every rank; gathered under FSDP)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


# -----------------------------------------------------------------------------
# FSDP2
#
# Plain DDP keeps fp32 weights, gradients and AdamW moments on every GPU: 16+ bytes per parameter,
# ~128 GB for an 8B model. FSDP2 (torch.distributed.fsdp.fully_shard) splits all three across the
# ranks: each decoder layer is one unit whose parameters are all-gathered just before its forward
# (and backward) and freed just after. The wrap is a few explicit lines; the rest of this section
# is what a training script needs around it: generating with the parameters gathered once,
# gradient accumulation, and gathered checkpoints.

def hf_model_in(module):
    """The Hugging Face model inside `module` (the module itself, or a wrapper such as
    Coconut/SequenceScorer)."""
    for m in module.modules():
        if hasattr(m, "config") and hasattr(m, "get_input_embeddings"):
            return m
    raise ValueError(f"no Hugging Face model inside {type(module).__name__}")

def decoder_layers(module):
    """The list of transformer blocks: the ModuleList with config.num_hidden_layers entries (GPT-2's
    transformer.h, Llama/Mistral/Qwen/Phi's model.layers), found by shape rather than by name so
    new architectures work too."""
    model = hf_model_in(module)
    n_layer = model.config.num_hidden_layers
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == n_layer:
            return list(m)
    name = type(model).__name__
    raise ValueError(f"{name}: found no ModuleList of {n_layer} decoder layers to shard")

def fsdp_wrap(module, device_type, *, bf16=False, reshard_after_forward=True):
    """Shard `module` over all ranks with FSDP2, in place, and return it. Every decoder layer is its
    own unit; the root unit (`module`, the one whose forward the training step calls: pass the
    wrapper, not the bare HF model, when the step goes through one) holds what is left: embeddings,
    final norm and LM head (tied or not, as one parameter). Master weights, gradients and optimizer
    state stay fp32 and sharded; bf16=True (CUDA) all-gathers bf16 copies for the compute and
    reduces gradients in fp32. Build the optimizer over module.parameters() after this call, so it
    holds the shards. reshard_after_forward=False keeps each layer gathered from its forward to its
    backward (one all-gather fewer per layer per step, a full model of memory more).
    Call it on a model still on the CPU (after init_process_group and torch.cuda.set_device): it
    moves each unit to the device one at a time and keeps only this rank's shard there, so the full
    model never has to fit on one GPU."""
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    if bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    for layer in decoder_layers(module):
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # the root's parameters are the first needed in the backward: keep them gathered after forward
    fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    # FSDP2 makes the first module to run forward the root; fix it now, or a generation that enters
    # through the HF model (e.g. an evaluation before the first step) would make a layer its own
    # root and break the training step
    module._get_fsdp_state()._lazy_init()
    module.layer_reshard_after_forward = reshard_after_forward  # what gathered() restores
    return module

def is_fsdp(module):
    return isinstance(module, FSDPModule)

@contextmanager
def gathered(module):
    """Inside the block, every FSDP unit of `module` is all-gathered once and stays gathered, so a
    generate call (hundreds of forwards of one token) costs one all-gather per layer instead of one
    per layer per token; the shards come back on exit. Call the HF model inside (e.g.
    model.generate / prefill+decode) as usual; every rank must enter together (the gather is a
    collective), but inside, ranks may run different numbers of forwards (no communication there).
    A no-op for a module that is not sharded."""
    if not is_fsdp(module):
        yield module
        return
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    # recursive: the forwards inside must not free what we gathered
    module.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield module
    finally:
        for layer in decoder_layers(module):
            layer.set_reshard_after_forward(module.layer_reshard_after_forward, recurse=False)
        for unit in units:
            unit.reshard()

def set_grad_sync(module, sync):
    """Gradient accumulation: reduce gradients across ranks only when sync is True (the last
    micro-step), for a DDP wrapper (require_backward_grad_sync) or an FSDP module
    (set_requires_gradient_sync); a no-op otherwise. Under FSDP a non-syncing micro-step keeps each
    layer's full fp32 gradient until the syncing one: the memory plan counts it (grad_accum > 1).
    Call it before each micro-step's forward."""
    if is_fsdp(module):
        module.set_requires_gradient_sync(sync)
    elif isinstance(module, DDP):
        module.require_backward_grad_sync = sync

def enable_activation_checkpointing(model):
    """Recompute each decoder layer's activations in the backward instead of keeping them (saves
    most activation memory for ~1/3 more compute). Non-reentrant checkpointing of the layer's
    forward only, so FSDP2's hooks stay outside the recompute: works with DDP and FSDP, before or
    after fsdp_wrap. Not for a forward that carries a KV cache across passes with gradients
    (Coconut's cached thought passes): transformers drops the cache in a checkpointed layer (a
    recompute would append its keys a second time), so each pass would stop seeing the earlier
    ones. tests/test_fsdp.py::test_checkpointing_drops_the_cache."""
    kwargs = {"use_reentrant": False}
    hf_model_in(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

# ---- checkpoints under FSDP: the plain full tensors of a DDP checkpoint, so each resumes the other

def full_tensor(t):
    """A DTensor shard gathered to the whole tensor (a collective: every rank calls it), moved to
    the CPU."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu()

def gather_full(obj, memo=None):
    """A copy of a state dict (nested dicts/lists) with every sharded tensor gathered whole onto the
    CPU. A tensor met twice (tied embeddings) is gathered once and stays shared, as in the unsharded
    state dict."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = full_tensor(obj)
        return memo[id(obj)]
    if isinstance(obj, dict):
        return {k: gather_full(v, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather_full(v, memo) for v in obj)
    return obj

def shard_like(full, like):
    """The whole tensor `full` cut like `like` (a DTensor shard of this rank), or as is for a plain
    tensor."""
    if not isinstance(like, DTensor):
        return full
    full = full.to(device=like.device, dtype=like.dtype)
    # every rank holds the whole checkpoint, so each cuts its own shard: no communication
    # (src_data_rank=None)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)

def load_full_state_dicts(model, optimizer, model_sd, optim_sd=None):
    """Load a full (DDP-format) checkpoint into a sharded or plain model and its optimizer; every
    rank passes the whole state dicts (each rank reads the checkpoint file). The optimizer must
    already exist over the shards."""
    current = model.state_dict()
    missing = set(current) - set(model_sd)
    if missing:
        example = sorted(missing)[:3]
        raise ValueError(f"checkpoint lacks {len(missing)} model tensors, e.g. {example}")
    model.load_state_dict({k: shard_like(v, current[k]) for k, v in model_sd.items()})
    if optim_sd is None:
        return
    # the optimizer's state tensors (AdamW's moments) are sharded exactly like their parameters
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for i, s in optim_sd["state"].items():
        state[i] = {k: shard_like(v, params[i]) if v.dim() > 0 else v for k, v in s.items()}
    optimizer.load_state_dict({"state": state, "param_groups": optim_sd["param_groups"]})
