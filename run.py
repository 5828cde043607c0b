"""
The run's life, shared by coconut.py and latro.py, so that each script shows only its method and
its loop: processes and device (torchrun, DDP, FSDP2), rank-0 printing, out_dir (a lock, no silent
overwrite), checkpoints (atomic, gathered whole, never with nan/inf weights, refused in one line
when they do not fit the run), the stop signals (Ctrl-C / SIGTERM save at a step boundary), the
non-finite guard before an update, and the memory plan checked before any weight is loaded.

A script uses it in a few lines:

    ddp, ddp_rank, ddp_world_size, device = start(out_dir, device, ddp_timeout, resume=..)
    ckpt = resume_run(out_dir, "coconut")                       # init_from=resume
    preflight(hf_config, device, longest, memory, out_dir)      # before any weight is loaded
    train_model = distribute(Wrapper(model), device, fsdp)      # DDP, FSDP2 or as it is
    stop = StopRequest()
    ... loop: require_finite(...), save_run(path, state, model, optimizer),
              if stop.requested(device): save_run(...); exit_on_signal(stop, ...)
    end_training(stop, model, fsdp); load_best(model, out_dir)
    end_distributed()
"""

import atexit
import datetime
import gc
import math
import os
import shutil
import signal
import socket
import sys
import zipfile
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import ConfigError, UserError
from model import max_positions, n_params_of_config

# -----------------------------------------------------------------------------
# processes and device

def print0(*args):
    """print on rank 0 only (torchrun gives every process its RANK; a plain run is rank 0)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args)

def start(out_dir, device, timeout, *, resume, overwrite, claim=True):
    """Set up the run before any data or model: rank 0 claims out_dir (prepare_out_dir: before the
    process group, so that a refusal ends every rank), then under torchrun the process group (NCCL
    on CUDA, gloo on the CPU; a dead peer ends it after `timeout` seconds) and this rank's GPU.
    claim=False (an evaluation) writes nothing. Returns ddp, ddp_rank, ddp_world_size, device."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    ddp_rank = int(os.environ.get("RANK", 0))
    ddp_world_size = int(os.environ.get("WORLD_SIZE", 1))
    if ddp_rank == 0 and claim:
        prepare_out_dir(out_dir, resume=resume, overwrite=overwrite)
    elif os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir {out_dir!r} is a file, not a directory: choose another --out_dir")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if ddp:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    return ddp, ddp_rank, ddp_world_size, device

def distributed():
    """True inside a torchrun launch once init_process_group has run."""
    return dist.is_available() and dist.is_initialized()

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
    return DDP(module, device_ids=device_ids)

def all_sum(t, device="cpu"):
    """A small tensor summed over the ranks (eval counts, logged stats, NaN flags), returned on the
    CPU. device: where the collective runs (NCCL takes CUDA tensors). Without a process group: t."""
    if distributed():
        t = t.to(device)
        dist.all_reduce(t)
    return t.cpu()

def ranks_identical(model):
    """Does every rank hold the same weights? (a cheap check after DDP training, a collective): each
    tensor's sum and sum of squares, in float64, must have the same min and max over the ranks."""
    p = [w.detach().double() for w in model.parameters()]
    sums = torch.stack([torch.stack([w.sum(), w.square().sum()]) for w in p])
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))

def end_training(stop, model, fsdp):
    """After the training loop: a signal acts at once again, and (DDP) a cheap check that every
    rank holds the same weights (FSDP ranks hold different shards by design)."""
    stop.restore()
    if distributed() and not fsdp:
        print0(f"ddp: parameters identical on {dist.get_world_size()} ranks: "
               f"{ranks_identical(model)}")

def end_distributed():
    """Leave the process group on every rank together. Drop the DDP/FSDP wrapper before calling
    this: a group torn down only at interpreter exit, its gloo threads still holding tensors,
    aborts the process ('terminate called without an active exception')."""
    if distributed():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()

def wandb_logger(enabled, project, name, config):
    """wandb.log on rank 0 when enabled (wandb imported only then), else a function that does
    nothing: the scripts call it unconditionally."""
    if not (enabled and int(os.environ.get("RANK", 0)) == 0):
        return lambda *args, **kwargs: None
    import wandb
    wandb.init(project=project, name=name, config=config)
    return wandb.log

# -----------------------------------------------------------------------------
# stop signals and the non-finite guard

class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (preemption, kill, torchrun) become a flag, so the run stops at a
    step boundary with a checkpoint instead of dying mid-step. A second signal acts at once, as the
    handlers installed before would (KeyboardInterrupt for Ctrl-C, termination for SIGTERM).

        stop = StopRequest()                   # once, before the loop (main thread)
        for step in range(start, max_steps):
            train_step()
            if stop.requested(device):         # under DDP: every rank, at the same step
                save_run(...); exit_on_signal(stop, ...)

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
        if distributed():
            t = torch.tensor([float(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        return flag

    def restore(self):
        """Put back the handlers that were installed before."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

def exit_on_signal(stop, where):
    """End every rank after a stop signal (the checkpoint is saved): say so, leave the process
    group, exit with 128 + the signal's number, as a process killed by it would report."""
    signum = stop.signum or signal.SIGTERM  # (the signal may have reached another rank only)
    print0(f"stopped by {signal.Signals(signum).name} {where}; continue with --init_from=resume")
    end_distributed()
    sys.exit(128 + signum)

def grad_norm(model):
    """The global gradient norm (after the sync: the same on every rank; gathered under FSDP)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)

def require_finite(what, loss, gnorm, ckpt_path):
    """Stop before an update whose loss or gradient holds a nan/inf: the values are summed over the
    ranks first, so every rank stops together, and ckpt.pt keeps the last good state."""
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        raise UserError(f"{what}: the loss ({loss}) or a gradient (norm {gnorm}) is nan/inf: "
                        f"training diverged; stopped before the update, {ckpt_path} keeps the last "
                        f"good state; lower the learning rate")

# -----------------------------------------------------------------------------
# out_dir: one run at a time, no silent overwrite

CKPT_NAME = "ckpt.pt"    # the resumable checkpoint of a run in out_dir
BEST_NAME = "best.pt"    # the best weights so far of that run (model selection)
EPOCH_NAME = "epoch_{}.pt"  # coconut.py keep_epoch_checkpoints: the weights after that many epochs
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
    """Check and claim out_dir before any work (start() calls it on rank 0). It
    - creates out_dir and write-probes it: a file, or a directory we cannot write, is a UserError;
    - takes out_dir's lock (released at exit); a second live run is a UserError naming its pid;
    - removes temporary files left by killed checkpoint writes (`*.pt.tmp.<pid>`);
    - resume=True: requires out_dir/ckpt.pt (else UserError); the run's best.pt is kept;
    - resume=False: refuses an out_dir holding ckpt.pt, best.pt or epoch_N.pt of an earlier run,
      unless overwrite=True, which deletes them now (printed): no stale best.pt beside a new
      ckpt.pt.
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
    epochs = [os.path.join(out_dir, n) for n in sorted(os.listdir(out_dir)) if is_epoch_file(n)]
    if (earlier or epochs) and not overwrite:
        lock.release()
        names = [os.path.basename(p) for p in earlier]
        names += [f"{len(epochs)} epoch_N.pt"] if epochs else []
        names = " and ".join(names)
        hint = "continue it with --init_from=resume, " if ckpt in earlier else ""
        raise UserError(f"out_dir {out_dir!r} holds {names} of an earlier run: {hint}start over "
                        f"with --overwrite=True (deletes them), or choose another --out_dir")
    for path in earlier + epochs:
        os.remove(path)
        print(f"out_dir: --overwrite=True: removed {path} of an earlier run")
    return lock

def epoch_path(out_dir, n):
    """out_dir/epoch_N.pt: coconut.py's keep_epoch_checkpoints file of the weights after n
    epochs."""
    return os.path.join(out_dir, EPOCH_NAME.format(n))

def is_epoch_file(name):
    """Is a file name one of keep_epoch_checkpoints' epoch_N.pt?"""
    head, tail = EPOCH_NAME.split("{}")
    number = name[len(head):-len(tail)]
    return name.startswith(head) and name.endswith(tail) and number.isdigit()

# -----------------------------------------------------------------------------
# checkpoints: plain tensors and Python values only, so torch.load(weights_only=True) reads them

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
    except BaseException as e:
        # an error or Ctrl-C mid-write: keep the old checkpoint, drop the partial one
        try:
            os.remove(tmp)
        except OSError:
            pass
        free, need = shutil.disk_usage(directory).free, tensor_bytes(obj)
        full = isinstance(e, RuntimeError) and free < need  # (torch reports a full disk so)
        if isinstance(e, OSError) or full:
            reason = f"the disk is full: {free / 2**20:.0f} MiB free, the checkpoint needs about "
            reason += f"{need / 2**20:.0f} MiB"
            if not full:
                reason = e.strerror or str(e).splitlines()[0]
            raise UserError(f"writing {path} failed ({reason}); the previous "
                            f"{os.path.basename(path)} is kept: make room or fix {directory}, "
                            f"then continue with --init_from=resume") from None
        raise
    _fsync_dir(directory)

def tensor_bytes(obj):
    """The bytes of every tensor in a nested dict/list (a checkpoint's size, about)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0

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

def nonfinite_names(named_tensors):
    """Names of the floating-point tensors holding a NaN or an inf (e.g. model.named_parameters()):
    call it before a save, so that non-finite weights never overwrite a good checkpoint."""
    bad = []
    for name, t in named_tensors:
        if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad

def save_run(path, state, model, optimizer=None):
    """A checkpoint: `state` (plain values) plus the model's weights and, given one, the optimizer's
    state, gathered whole (a collective under FSDP: every rank calls it; keys as the unsharded
    model's, so a DDP and an FSDP run resume each other). Weights with a nan/inf are never written:
    every rank sees the same gathered values and stops with the same error, and the last good file
    stays. Rank 0 writes."""
    model_sd = gather_full(model.state_dict())
    bad = nonfinite_names(model_sd.items())
    if bad:
        raise UserError(f"non-finite weights ({', '.join(bad[:3])}) after step "
                        f"{state.get('iter_num')}: {os.path.basename(path)} not written, the last "
                        f"one kept; lower the learning rate")
    obj = {**state, "model": model_sd}
    if optimizer is not None:
        obj["optimizer"] = gather_full(optimizer.state_dict())
    if int(os.environ.get("RANK", 0)) == 0:
        save_checkpoint(path, obj)

def load_checkpoint(path, map_location="cpu"):
    """A checkpoint file, or a UserError in one line when it is missing or unreadable."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: check out_dir / init_from, or start with "
                        f"init_from=scratch")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, wrong file, pickled objects ...
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: "
                        f"{str(e).splitlines()[0]}); delete it and restart, or point init_from "
                        f"at another checkpoint") from None

def load_run(path, script, resume=False):
    """A checkpoint written by `script` ('coconut' or 'latro'), refused by name when another script
    (or anything else) wrote it; resume=True: one that holds where to continue (a ckpt.pt, not a
    best.pt). Checkpoints from before the 'script' entry are recognised by their contents
    (latro.py's slot for π0, coconut.py's `method` key)."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint of this project "
                        f"(a dict with the model's weights): give a ckpt.pt or best.pt of "
                        f"{script}.py")
    if resume and "optimizer" not in ckpt:
        raise UserError(f"{path} holds weights only (a best.pt?): resuming needs the ckpt.pt the "
                        f"run wrote; to go on from these weights, start a new run from them")
    maker = ckpt.get("script")
    if maker is None and "ref_model" in ckpt:
        maker = "latro"
    elif maker is None and "method" in ckpt.get("config", {}):
        maker = "coconut"
    if maker != script:
        made = f"{maker}.py" if maker else "another script"
        raise UserError(f"{path} is not a {script}.py checkpoint (written by {made}): give a "
                        f"checkpoint of {script}.py, start with --init_from=scratch or an HF model")
    return ckpt

def resume_run(out_dir, script):
    """out_dir/ckpt.pt to resume, refused in one line when it is not `script`'s ckpt.pt or when the
    best.pt the run chose (and tests at the end) is missing or cut short."""
    ckpt = load_run(os.path.join(out_dir, CKPT_NAME), script, resume=True)
    best = ckpt.get("best_val_acc", ckpt.get("best_dev_acc", -1))
    if best >= 0:
        check_whole(os.path.join(out_dir, BEST_NAME), f"this run chose its best weights there "
                    f"(val acc {best:.4f}) and tests them at the end")
    return ckpt

def load_best(model, out_dir, device="cpu"):
    """The run's best.pt weights into `model` on every rank (once rank 0 has written them). Returns
    the checkpoint's other entries."""
    if distributed():
        dist.barrier()
    best = load_checkpoint(os.path.join(out_dir, BEST_NAME), map_location=device)
    load_full_state_dicts(model, None, best.pop("model"))
    return best

def check_whole(path, why):
    """A cheap check that a checkpoint file this run will need is there and whole: torch.save writes
    a zip archive whose directory sits at its end, so a truncated file has none. why: what needs
    it (for the message)."""
    try:
        zipfile.ZipFile(path).close()
    except (OSError, zipfile.BadZipFile) as e:
        problem = "missing" if isinstance(e, FileNotFoundError) else "truncated or not a checkpoint"
        raise UserError(f"{path} is {problem}, but {why}: restore it, or start a new run in "
                        f"another --out_dir") from None

def check_same_run(saved, config, keys, renamed=None):
    """Resume tells the truth: a UserError naming each of `keys` whose value in the checkpoint's
    config (`saved`) differs from this run's `config`, e.g. check_same_run(ckpt["config"], config,
    ("task", "n_layer", "seed")). A key the checkpoint lacks counts as different (another script's
    or an older checkpoint); renamed: {old key: new key}, for checkpoints written before a
    rename."""
    saved = {(renamed or {}).get(k, k): v for k, v in saved.items()}
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

def save_hf_export(model, tok, path):
    """out_dir/hf: the weights (gathered whole: a collective under FSDP) and the tokenizer, as
    save_pretrained writes them, loadable with from_pretrained. Every rank calls it; rank 0
    writes."""
    model_sd = gather_full(model.state_dict())
    if int(os.environ.get("RANK", 0)) == 0:
        hf_model_in(model).save_pretrained(path, state_dict=model_sd)
        tok.save_pretrained(path)

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
                grad_accum=1, kv_cache_bytes=0, activations_bytes=0, device_bytes=None):
    """Estimated bytes per GPU. mode 'ddp' (every rank holds everything) or 'fsdp' (weights,
    gradients, optimizer state and a 'sharded' reference split over world_size); precision 'fp32'
    or 'bf16' (fp32 master weights, bf16 compute); reference: the frozen reference model, 'none',
    'full' (fp32 copy), 'sharded' (fp32, FSDP) or 'bf16'. Generation (gathered weights + KV cache)
    and the update (activations) do not overlap: the larger one counts. grad_accum > 1 means
    gradients synced on the last micro-step only: FSDP then holds full fp32 gradients in between
    (pass 1 when every micro-step syncs). Returns a dict of the parts, 'total', 'bytes_per_param'
    (of the persistent parts) and 'device'. (The keywords are the parts of the plan, one each.)"""
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
    """Total memory of a CUDA device; on the CPU the host's memory shared by this host's ranks
    (torchrun's LOCAL_WORLD_SIZE)."""
    if not str(device).startswith("cuda"):
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return host // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
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
              "a smaller micro-batch (micro_batch_size; gen_batch_size for the rollouts' KV cache)"]
    unit, where = "GPU", "device's"
    if plan.get("host"):
        unit, where = "process", "host memory per process"
    raise ConfigError(f"estimated {plan['total'] / GiB:.1f} GiB per {unit} exceeds the {where} "
                      f"{plan['device'] / GiB:.1f} GiB:\n{format_memory_plan(plan)}\n"
                      f"fixes (any of):\n  " + "\n  ".join(fixes))

def preflight(hf_cfg, device, longest, memory, out_dir=None, extra_weights=0):
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
                activations):
    """The memory plan of a run, printed, and refused before any weight is loaded when it cannot
    fit the device. kv_cache: (rows, tokens) of the largest generate call; activations: (tokens,
    logit positions, checkpointing) of one micro-step."""
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
                       device_bytes=device_memory_bytes(device))
    plan["host"] = not str(device).startswith("cuda")
    print0(format_memory_plan(plan))
    check_memory_plan(plan)
    return n_params
