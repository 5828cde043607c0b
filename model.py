"""
What coconut.py and latro.py share about the model: loading it (a tiny config from scratch, or any Hugging Face
causal LM by name or local path), log-probabilities of target tokens computed only where they are needed, a
KV-cached decoding loop, and the atomic checkpoint write, with the out_dir rules (a lock, no
silent overwrite) and a Ctrl-C/SIGTERM flag that lets a run stop cleanly at a step boundary.

Everything here works with any `transformers` causal LM that accepts `inputs_embeds`, `position_ids`,
`attention_mask` and a `DynamicCache` (GPT-2, Llama, Qwen, Mistral, Phi, SmolLM ...).
"""

import atexit
import dataclasses
import functools
import gc
import inspect
import os
import signal
import socket
import sys
from contextlib import nullcontext

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from configurator import UserError

# -----------------------------------------------------------------------------
# loading

def pick_attention(attn_implementation, device_type):
    """'auto' -> flash_attention_2 when flash-attn is installed and we are on CUDA, else PyTorch SDPA."""
    if attn_implementation != "auto":
        return attn_implementation
    if device_type == "cuda":
        try:
            import flash_attn  # noqa: F401  (optional GPU extra, see requirements-gpu.txt)
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"

def load_model(init_from, vocab_size, *, arch="gpt2", n_layer=2, n_head=4, n_embd=128, block_size=512,
               dropout=0.0, bos_id=None, eos_id=None, pad_id=None, attn_implementation="auto", device_type="cpu"):
    """A causal LM in fp32 on the CPU (the caller moves it). init_from='scratch' builds a tiny model with the given
    shape and vocabulary; anything else is a hub name or a local directory for from_pretrained."""
    attn = pick_attention(attn_implementation, device_type)
    if init_from == "scratch":
        if arch == "gpt2":
            cfg = AutoConfig.for_model("gpt2", vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd,
                                       n_layer=n_layer, n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout,
                                       attn_pdrop=dropout, bos_token_id=bos_id, eos_token_id=eos_id,
                                       pad_token_id=pad_id)
        elif arch == "llama":
            cfg = AutoConfig.for_model("llama", vocab_size=vocab_size, max_position_embeddings=block_size,
                                       hidden_size=n_embd, intermediate_size=4 * n_embd, num_hidden_layers=n_layer,
                                       num_attention_heads=n_head, num_key_value_heads=n_head,
                                       attention_dropout=dropout, tie_word_embeddings=True, bos_token_id=bos_id,
                                       eos_token_id=eos_id, pad_token_id=pad_id)
        else:
            raise ValueError(f"arch={arch!r} is not known for init_from='scratch': use 'gpt2' or 'llama'")
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    else:
        if not os.path.isdir(init_from) and os.path.exists(init_from):
            raise ValueError(f"init_from={init_from!r} is a file; give a directory written by save_pretrained, "
                             f"a hub name, 'scratch' or 'resume'")
        model = AutoModelForCausalLM.from_pretrained(init_from, attn_implementation=attn, dtype=torch.float32)
    if model.get_input_embeddings().weight.shape[0] < vocab_size:
        # added special tokens (e.g. Coconut's three markers) need rows; extra rows stay the padding-to-64 kind
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    return model

def backbone(model):
    """The transformer without the LM head; its .last_hidden_state is taken after the final norm."""
    return model.base_model

def lm_head(model):
    return model.get_output_embeddings()

def autocast_ctx(device_type, precision=None):
    """bf16 autocast on CUDA (no fp16, no GradScaler); plain fp32 on the CPU. precision='fp32' or 'bf16' chooses
    explicitly (bf16 autocast on any device; weights and optimizer stay fp32 either way)."""
    if precision is None:
        precision = "bf16" if device_type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    if precision == "fp32":
        return nullcontext()
    raise ValueError(f"precision={precision!r}: use 'fp32' or 'bf16'")

# -----------------------------------------------------------------------------
# log-probabilities of targets, only where they are used

def left_pad(seqs, pad_id, device="cpu"):
    """Token lists of different lengths -> input_ids and attention_mask (B, T), padded on the left so every row's
    last token is in the last column (where generation continues)."""
    T = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (T - len(s)) + list(s) for s in seqs], device=device)
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask

def position_ids_from_mask(attention_mask):
    """Positions that skip left padding: row [0 0 1 1 1] -> [0 0 0 1 2]. (B, T) long."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

def token_logprobs(model, hidden, targets, mask):
    """log p(targets) from hidden states (B, T, C), in fp32, with the LM head applied only at mask positions:
    a full-vocabulary head on every position is most of a small model's memory and a waste for masked tokens."""
    out = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)  # (B, T)
    logits = lm_head(model)(hidden[mask]).float()  # (N, V): N = mask.sum()
    out[mask] = logits.log_softmax(-1).gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    return out

# -----------------------------------------------------------------------------
# KV-cached decoding

# The cache argument was renamed: older transformers (5.17) take `past_key_values=`, newer ones
# (5.24) take `cache=` and warn that `past_key_values` goes in 5.40. We ask each model's forward
# which name it has; a forward(**kwargs) gets the name this transformers' own outputs use.
_OUTPUT_FIELDS = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
LIBRARY_CACHE_NAME = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"

@functools.lru_cache(maxsize=None)
def _cache_name_of(cls):
    params = inspect.signature(cls.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return LIBRARY_CACHE_NAME

def cache_kwargs(module, cache):
    """{name: cache}: the KV cache under the argument name `module` expects (a causal LM or its
    backbone; DDP and compile wrappers are looked through). Use: m(..., **cache_kwargs(m, c))."""
    inner = getattr(module, "_orig_mod", module)  # torch.compile
    inner = getattr(inner, "module", inner)       # DistributedDataParallel
    return {_cache_name_of(type(inner)): cache}

@functools.lru_cache(maxsize=None)
def _output_cache_field(cls):
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return "cache" if "cache" in names else "past_key_values"

def output_cache(out):
    """The KV cache a forward returned: `out.cache` on new transformers, `out.past_key_values` on
    old ones (read without triggering the deprecation warning)."""
    return getattr(out, _output_cache_field(type(out)))

@torch.no_grad()
def prefill(model, input_ids, attention_mask):
    """Encode a left-padded prompt batch once; returns the last position's logits (B, V) fp32 and the cache."""
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=True,
                logits_to_keep=1, **cache_kwargs(model, DynamicCache()))
    return out.logits[:, -1].float(), output_cache(out)

def sample_next(logits, temperature, top_p, generator):
    """Greedy when temperature == 0, else sample from softmax(logits / T) restricted to the top-p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits / temperature).softmax(-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the smallest prefix whose mass reaches top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

def ends_with_stop(tokens, stop_sequences):
    """(B,) bool: does each row of tokens (B, t) currently end with one of the stop sequences?"""
    hit = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for seq in stop_sequences:
        n = len(seq)
        if 0 < n <= tokens.shape[1]:
            hit |= (tokens[:, -n:] == torch.tensor(seq, device=tokens.device)).all(-1)
    return hit

@torch.no_grad()
def decode(model, last_logits, past_key_values, attention_mask, max_new_tokens, *, stop_sequences, pad_id,
           temperature=0.0, top_p=1.0, generator=None, stop_check=None):
    """Continue a prefilled batch one token at a time with the KV cache.
    A row is finished once its tokens end with a stop sequence (kept in the output, pad after it); the loop ends
    when every row is finished. Every step draws for the whole batch, so a row's tokens never depend on when the
    other rows stop: early stopping returns exactly the no-early-stop tokens cut at the first stop.
    stop_check(tokens, finished) -> (B,) bool, optional: more rows that are finished now (e.g. a stop string
    found in the decoded text). Returns tokens (B, T_new) and stopped (B,) bool."""
    B = last_logits.shape[0]
    device = last_logits.device
    logits, mask = last_logits, attention_mask
    tokens = torch.empty(B, 0, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)  # (B,)
        nxt = nxt.masked_fill(finished, pad_id)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        finished |= ends_with_stop(tokens, stop_sequences)
        if stop_check is not None:
            finished |= stop_check(tokens, finished)
        if finished.all():
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=position_ids_from_mask(mask)[:, -1:],
                    use_cache=True, **cache_kwargs(model, past_key_values))
        logits, past_key_values = out.logits[:, -1].float(), output_cache(out)
    return tokens, finished

def generate(model, input_ids, attention_mask, max_new_tokens, **decode_kwargs):
    """prefill + decode for a left-padded prompt batch."""
    last_logits, cache = prefill(model, input_ids, attention_mask)
    return decode(model, last_logits, cache, attention_mask, max_new_tokens, **decode_kwargs)

# -----------------------------------------------------------------------------
# checkpoints: plain tensors and Python values only, so torch.load(weights_only=True) can read them

def save_checkpoint(path, obj):
    """Write to a temporary file of this process (`<path>.tmp.<pid>`), fsync it, then rename it
    over `path`: a crash or kill mid-write leaves the previous checkpoint at `path` intact, and two
    processes writing one path never share a temporary file. A failed write removes its own."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
        os.replace(tmp, path)     # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        # an error or Ctrl-C mid-write: keep the old checkpoint, drop the partial one
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)

def _fsync_dir(directory):
    """Make a rename durable (a power cut after os.replace keeps the new name), where the OS can."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

# out_dir: one run at a time, no silent overwrite; a clean stop on Ctrl-C / SIGTERM

CKPT_NAME = "ckpt.pt"    # the resumable checkpoint of a run in out_dir
BEST_NAME = "best.pt"    # the best weights so far of that run (model selection)
LOCK_NAME = "run.lock"   # flock-ed by the process that writes out_dir; holds its pid and host

class OutDirLock:
    """The lock prepare_out_dir takes. The kernel drops an flock when its process dies (SIGKILL
    included), so the lock of a dead run is never stale: the next run takes it. Released at exit."""

    def __init__(self, path, fd):
        self.path, self.fd = path, fd

    def release(self):
        if self.fd is None:
            return
        import fcntl
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        # the file stays: removing it could let two later runs lock two different files
        self.fd = None

def _lock_out_dir(out_dir):
    """Take out_dir's lock or raise a UserError naming the process that holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX (Windows): no lock, the other rules still apply
        return OutDirLock(None, None)
    path = os.path.join(out_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").split()
        os.close(fd)
        who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
        raise UserError(f"out_dir {out_dir!r} is in use by another run ({who}); wait for it to "
                        f"end, stop it, or choose another --out_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    lock = OutDirLock(path, fd)
    atexit.register(lock.release)
    return lock

def prepare_out_dir(out_dir, *, resume, overwrite=False):
    """Check and claim out_dir before any work. Call it once, on the master process, before data or
    model loading (under torchrun, before init_process_group: if it fails, torchrun ends the other
    ranks). It
    - creates out_dir and write-probes it: a file, or a directory we cannot write, is a UserError;
    - takes out_dir's lock (released at exit); a second live run is a UserError naming its pid;
    - removes temporary files left by killed checkpoint writes (`*.pt.tmp.<pid>`);
    - resume=True: requires out_dir/ckpt.pt (else UserError); the run's best.pt is kept;
    - resume=False: refuses an out_dir holding ckpt.pt or best.pt of an earlier run, unless
      overwrite=True, which deletes both now (printed): no stale best.pt beside a new ckpt.pt.
    Returns the OutDirLock (release() it to end early; tests do)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir {out_dir!r} is a file, not a directory: choose another --out_dir")
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write_probe.{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"out_dir {out_dir!r} cannot be written ({e.strerror}): "
                        f"choose another --out_dir") from None
    lock = _lock_out_dir(out_dir)
    for name in sorted(os.listdir(out_dir)):
        if ".pt.tmp." in name:  # we hold the lock, so no live run of ours is writing it
            os.remove(os.path.join(out_dir, name))
            print(f"out_dir: removed {name}, left by an interrupted checkpoint write")
    ckpt, best = os.path.join(out_dir, CKPT_NAME), os.path.join(out_dir, BEST_NAME)
    if resume:
        if not os.path.isfile(ckpt):
            lock.release()
            raise UserError(f"init_from='resume' but out_dir {out_dir!r} has no {CKPT_NAME}: "
                            f"point --out_dir at the run to continue, or use --init_from=scratch")
        return lock
    earlier = [p for p in (ckpt, best) if os.path.isfile(p)]
    if earlier and not overwrite:
        lock.release()
        names = " and ".join(os.path.basename(p) for p in earlier)
        hint = "continue it with --init_from=resume, " if ckpt in earlier else ""
        raise UserError(f"out_dir {out_dir!r} holds {names} of an earlier run: {hint}start over "
                        f"with --overwrite=True (deletes them), or choose another --out_dir")
    for path in earlier:
        os.remove(path)
        print(f"out_dir: --overwrite=True: removed {path} of an earlier run")
    return lock

class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (preemption, kill, torchrun) become a flag, so the run stops at a
    step boundary with a checkpoint instead of dying mid-step. A second signal acts at once, as the
    handlers installed before would (KeyboardInterrupt for Ctrl-C, termination for SIGTERM).

        stop = StopRequest()                   # once, before the loop (main thread)
        for step in range(start, max_steps):
            train_step()
            if stop.requested(device):         # under DDP: every rank, at the same step
                save_checkpoint(ckpt_path, state); break

    requested() all-reduces the flag (max) when torch.distributed is initialized, so every rank
    stops at the same step even when only one rank got the signal."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.signum = None  # the first signal received, or None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        if self.signum is not None:  # asked twice: stop now, as the process would without us
            self.restore()
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        # os.write, not print: the signal may have interrupted a print, which is not reentrant
        name = signal.Signals(signum).name
        msg = f"\n{name}: stopping after this step with a checkpoint (send it again to stop now)\n"
        os.write(sys.stderr.fileno(), msg.encode())

    def requested(self, device=None):
        """True once a signal arrived (on any rank under DDP); call it at step boundaries."""
        flag = self.signum is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([float(flag)], device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        return flag

    def restore(self):
        """Put back the handlers that were installed before."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

def check_same_run(saved, config, keys):
    """Resume tells the truth: a UserError naming each of `keys` whose value in the checkpoint's
    config (`saved`) differs from this run's `config`, e.g. check_same_run(ckpt["config"], config,
    ("task", "n_layer", "seed")). A key the checkpoint lacks counts as different (another script's
    or an older checkpoint)."""
    missing = object()
    diffs = []
    for key in keys:
        old, new = saved.get(key, missing), config.get(key, missing)
        if old is not new and old != new:
            shown = "<absent>" if old is missing else repr(old)
            diffs.append(f"{key}: checkpoint {shown}, now {new!r}")
    if diffs:
        raise UserError(f"the checkpoint was made with other settings ({'; '.join(diffs)}): resume "
                        f"with the checkpoint's values, or start a new run in another --out_dir")

def nonfinite_names(named_tensors):
    """Names of the floating-point tensors holding a NaN or an inf (e.g. model.named_parameters()):
    call it before a save, so that non-finite weights never overwrite a good checkpoint."""
    bad = []
    for name, t in named_tensors:
        if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad

def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}: check out_dir / init_from, or start with init_from=scratch")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, wrong file, pickled objects ...
        raise RuntimeError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}); "
                           f"delete it and restart, or point init_from at another checkpoint") from e

# -----------------------------------------------------------------------------
# FSDP2 and the memory plan
#
# Plain DDP keeps fp32 weights, gradients and AdamW moments on every GPU: 16+ bytes per parameter,
# ~128 GB for an 8B model. FSDP2 (torch.distributed.fsdp.fully_shard) splits all three across the
# ranks: each decoder layer is one unit whose parameters are all-gathered just before its forward
# (and backward) and freed just after. The wrap is a few explicit lines; the rest of this section is
# what a training script needs around it: generating with the parameters gathered once, gradient
# accumulation, gathered checkpoints, and a memory plan that refuses a run that cannot fit before
# anything is loaded.

from contextlib import contextmanager

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

def hf_model_in(module):
    """The Hugging Face model inside `module` (the module itself, or a wrapper such as
    Coconut/SequenceScorer)."""
    for m in module.modules():
        if hasattr(m, "config") and hasattr(m, "get_input_embeddings"):
            return m
    raise ValueError(f"no Hugging Face model inside {type(module).__name__}")

def decoder_layers(module):
    """The list of transformer blocks: the ModuleList with config.num_hidden_layers entries (GPT-2's
    transformer.h, Llama/Mistral/Qwen/Phi's model.layers), found by shape rather than by name so new
    architectures work too."""
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
    per layer per token; the shards come back on exit. Call the HF model inside (e.g. model.generate
    / prefill+decode) as usual; every rank must enter together (the gather is a collective), but
    inside, ranks may run different numbers of forwards (no communication there). A no-op for a
    module that is not sharded."""
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
    elif isinstance(module, torch.nn.parallel.DistributedDataParallel):
        module.require_backward_grad_sync = sync

def enable_activation_checkpointing(model):
    """Recompute each decoder layer's activations in the backward instead of keeping them (saves
    most activation memory for ~1/3 more compute). Non-reentrant checkpointing of the layer's
    forward only, so FSDP2's hooks stay outside the recompute: works with DDP and FSDP, before or
    after fsdp_wrap. Not for a forward that carries a KV cache across passes with gradients
    (Coconut's cached thought passes): transformers drops the cache in a checkpointed layer (a
    recompute would append its keys a second time), so each pass would stop seeing the earlier ones.
    tests/test_fsdp.py::test_checkpointing_drops_the_cache."""
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

def full_state_dicts(model, optimizer):
    """(model state dict, optimizer state dict) of an FSDP-sharded or plain model, as whole CPU
    tensors keyed as model.state_dict() / optimizer.state_dict() key them unsharded: the DDP
    checkpoint's format. A collective under FSDP (every rank calls it; only the master needs to save
    the result). `model` is the HF model (not a wrapper), so the keys carry no wrapper prefix."""
    return gather_full(model.state_dict()), gather_full(optimizer.state_dict())

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

def save_pretrained_full(model, model_sd, path):
    """The Hugging Face export (config + safetensors) from a gathered state dict; call it on the
    master only."""
    hf_model_in(model).save_pretrained(path, state_dict=model_sd)

def export_hf(model, tok, model_sd, path, master):
    """out_dir/hf: weights (a gathered state dict) and tokenizer, loadable with from_pretrained.
    Every rank calls it after gathering; the master writes."""
    if master:
        save_pretrained_full(model, model_sd, path)
        tok.save_pretrained(path)

# ---- the few collectives both scripts share (each script keeps its DDP set-up and loop in view)

def distributed():
    """True inside a torchrun launch once init_process_group has run."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()

def all_sum(t, device="cpu"):
    """A small tensor summed over the ranks (eval counts, logged stats, NaN flags), returned on the
    CPU. device: where the collective runs (NCCL takes CUDA tensors). Without a process group: t."""
    if distributed():
        t = t.to(device)
        torch.distributed.all_reduce(t)
    return t.cpu()

def ranks_identical(model):
    """Does every rank hold the same weights? (a cheap check after DDP training, a collective): each
    tensor's sum and sum of squares, in float64, must have the same min and max over the ranks."""
    p = [w.detach().double() for w in model.parameters()]
    sums = torch.stack([torch.stack([w.sum(), w.square().sum()]) for w in p])
    lo, hi = sums.clone(), sums.clone()
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))

def end_distributed():
    """Leave the process group on every rank together. Drop the DDP/FSDP wrapper before calling this:
    a group torn down only at interpreter exit, its gloo threads still holding tensors, aborts the
    process ('terminate called without an active exception')."""
    if distributed():
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

def wandb_logger(enabled, master, project, name, config):
    """wandb.log on the master when enabled (wandb imported only then), else a function that does
    nothing: the scripts call it unconditionally."""
    if not (enabled and master):
        return lambda *args, **kwargs: None
    import wandb
    wandb.init(project=project, name=name, config=config)
    return wandb.log

# ---- the memory plan: per-GPU bytes before anything is loaded

GiB = 2 ** 30
PLAN_PARTS = ("weights", "grads", "optimizer", "reference", "gathered", "kv_cache", "activations")
OPTIMIZER_BYTES = {"adamw": 8, "none": 0}  # fp32 state per parameter: AdamW keeps two moments

def n_params_of_config(cfg):
    """Exact parameter count of the causal LM a transformers config describes, tied weights counted
    once, by building it on the meta device (no memory, no download beyond config.json)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())

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
                grad_accum=1, kv_cache_bytes=0, activations_bytes=0, device_bytes=None):
    """Estimated bytes per GPU. mode 'ddp' (every rank holds everything) or 'fsdp' (weights,
    gradients, optimizer state and a 'sharded' reference split over world_size); precision 'fp32' or
    'bf16' (fp32 master weights, bf16 compute); reference: the frozen reference model, 'none',
    'full' (fp32 copy), 'sharded' (fp32, FSDP) or 'bf16'. Generation (gathered weights + KV cache)
    and the update (activations) do not overlap: the larger one counts. grad_accum > 1 means
    gradients synced on the last micro-step only: FSDP then holds full fp32 gradients in between
    (pass 1 when every micro-step syncs). Returns a dict of the parts, 'total', 'bytes_per_param'
    (of the persistent parts) and 'device'."""
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
    """Total memory of a CUDA device; None on the CPU (no check: processes share the host's
    memory)."""
    if not str(device).startswith("cuda"):
        return None
    return torch.cuda.get_device_properties(torch.device(device)).total_memory

def format_memory_plan(plan):
    """The plan as a few aligned lines for the start-up log."""
    head = (f"memory plan: {plan['n_params'] / 1e9:.3f}B parameters, {plan['mode']} on "
            f"{plan['world_size']} GPU(s), {plan['bytes_per_param']:.1f} bytes/parameter per GPU "
            f"before generation and activations")
    lines = [head]
    for k in PLAN_PARTS + ("total",):
        lines.append(f"  {k:<12}{plan[k] / GiB:7.2f} GiB")
    if plan["device"] is None:
        lines.append(f"  {'device':<12}  not checked (CPU)")
    else:
        lines.append(f"  {'device':<12}{plan['device'] / GiB:7.2f} GiB")
    return "\n".join(lines)

def check_memory_plan(plan):
    """Raise ConfigError naming the fixes when the estimate exceeds the device (call it before
    loading)."""
    from configurator import ConfigError
    if plan["device"] is None or plan["total"] <= plan["device"]:
        return
    fixes = []
    if plan["mode"] == "ddp":
        fixes.append("--fsdp=True (shards weights, gradients and optimizer state over the GPUs)")
    fixes += ["more GPUs (under --fsdp=True each holds 1/world_size of the sharded state)",
              "--gradient_checkpointing=True (activations)",
              "a smaller micro-batch (micro_batch_size; gen_batch_size for the rollouts' KV cache)"]
    raise ConfigError(f"estimated {plan['total'] / GiB:.1f} GiB per GPU exceeds the device's "
                      f"{plan['device'] / GiB:.1f} GiB:\n{format_memory_plan(plan)}\n"
                      f"fixes (any of):\n  " + "\n  ".join(fixes))
