"""
The files of a run in out_dir, written so that nothing is lost: one run at a time (a lock), no
silent overwrite of an earlier run, checkpoints written atomically (temp file, fsync, rename),
gathered whole under FSDP, never with nan/inf weights, plain tensors and Python values only (so
`torch.load(weights_only=True)` reads them), and refused in one line when they do not fit the run
(another script's, another run's settings, a weights-only file, a truncated one).

    prepare_out_dir(out_dir, resume=False)          # rank 0, before any work (run.Run does it)
    save_run(path, state, model, optimizer)         # every rank: a collective under FSDP
    ckpt = resume_run(out_dir, "coconut")           # ckpt.pt of this script, its best.pt whole
"""

import atexit
import os
import shutil
import socket
import zipfile

import torch
import torch.distributed as dist

from configurator import RENAMED, UserError
from parallel import distributed, gather_full, hf_model_in, load_full_state_dicts

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

def check_writable(out_dir):
    """Create out_dir and write-probe it: a file there, or a directory that cannot be written, is a
    UserError before any work."""
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

def prepare_out_dir(out_dir, *, resume, overwrite=False, reads=()):
    """Check and claim out_dir before any work (run.Run calls it on rank 0). It
    - creates out_dir and write-probes it (check_writable); ckpt.pt, best.pt or run.lock there that
      is not a file (a directory) is a UserError;
    - takes out_dir's lock (released at exit); a second live run is a UserError naming its pid;
    - removes temporary files left by killed writes (`*.tmp.<pid>`);
    - resume=True: requires out_dir/ckpt.pt (else UserError); the run's best.pt is kept;
    - resume=False: refuses an out_dir holding ckpt.pt, best.pt or epoch_N.pt of an earlier run,
      unless overwrite=True, which deletes them now (printed): no stale best.pt beside a new
      ckpt.pt. reads: files the run is about to read (init_from): one that overwrite would delete
      is refused before anything is deleted.
    Returns the OutDirLock (release() it to end early; tests do)."""
    check_writable(out_dir)
    for name in (CKPT_NAME, BEST_NAME, LOCK_NAME):
        path = os.path.join(out_dir, name)
        if os.path.exists(path) and not os.path.isfile(path):
            raise UserError(f"{path} is a directory, not a file of this project: move it away, or "
                            f"choose another --out_dir")
    lock = _lock_out_dir(out_dir)
    for name in sorted(os.listdir(out_dir)):
        tail = name.rsplit(".tmp.", 1)[-1]
        if ".tmp." in name and tail.isdigit():  # we hold the lock: no live run of ours writes it
            os.remove(os.path.join(out_dir, name))
            print(f"out_dir: removed {name}, left by an interrupted write")
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
    read = {os.path.realpath(p) for p in reads if p and os.path.isfile(p)}
    doomed = [p for p in earlier + epochs if os.path.realpath(p) in read]
    if doomed:
        lock.release()
        raise UserError(f"--overwrite=True would delete {doomed[0]}, which this run starts from "
                        f"(init_from): copy it out of out_dir first, or choose another --out_dir")
    for path in earlier + epochs:
        os.remove(path)
        print(f"out_dir: --overwrite=True: removed {path} of an earlier run")
    return lock

def write_text(path, text):
    """A text file written atomically (a temporary file of this process, then renamed over `path`):
    a kill or a full disk mid-write leaves the previous file whole. A UserError when it fails."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write {path} ({e.strerror}); the previous file, if any, is kept: "
                        f"make room or choose another path") from None

def keep_lines(path, n):
    """Cut a text file (the metrics log) to its first n lines; a missing file is left missing."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()[:n]
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]  # a line cut short by a kill mid-write
    write_text(path, "".join(lines))

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

def resume_run(out_dir, script, keys=()):
    """out_dir/ckpt.pt to resume, refused in one line when it is not `script`'s ckpt.pt, or when the
    best.pt the run chose (and tests at the end) is missing, cut short, or not this run's: another
    script's, other settings among `keys`, weights of other shapes."""
    ckpt = load_run(os.path.join(out_dir, CKPT_NAME), script, resume=True)
    score = ckpt.get("best_val_acc", ckpt.get("best_dev_acc", -1))
    if score < 0:
        return ckpt
    path = os.path.join(out_dir, BEST_NAME)
    why = f"this run chose its best weights there (val acc {score:.4f}) and tests them at the end"
    check_whole(path, why)
    best = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # (reads no weights)
    # (older best.pt: no config; older configs: keys under their former names, RENAMED)
    config, ours = ({RENAMED.get(k, k): v for k, v in c.items()}
                    for c in (best.get("config", ckpt["config"]), ckpt["config"]))
    differ = [k for k in keys if config.get(k) != ours.get(k)]
    problem = None
    if best.get("script", script) != script:
        problem = f"written by {best['script']}.py"
    elif differ:
        problem = "other settings: " + ", ".join(differ)
    elif any(k not in best["model"] or best["model"][k].shape != v.shape
             for k, v in ckpt["model"].items()):
        problem = "weights of other shapes"
    if problem:
        raise UserError(f"{path} is not this run's best.pt ({problem}), but {why}: restore it, or "
                        f"start a new run in another --out_dir")
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

