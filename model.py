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
