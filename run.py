"""
The run's life, the same for both scripts, so that each event of a training loop is one line:

    run = Run("coconut", config)                           # processes, device, out_dir claimed,
                                                           # the checkpoint to start from
    run.restore(model, optimizer)                          # resume: weights, AdamW state, RNG
    ... every step:  run.require_finite(what, loss, model)         # before the update
                     run.after_step(model, optimizer, "after step 7", save=due, iter_num=7, ...)
    ... every eval:  run.keep_best(val_acc, model, ...); run.save(model, optimizer, ...)
    run.end(model)                                         # signals act at once again
    run.load_best(model)                                   # the best-by-val weights
    run.close()                                            # leave the process group

after_step saves ckpt.pt when a save is due, and when Ctrl-C or SIGTERM arrived (on any rank) it
saves and ends every rank with 128 + the signal's number, as a killed process would report; the
run then continues exactly with --init_from=resume. ckpt.pt, best.pt and every other weight file
say which script and configuration wrote them (run.info), so a resume can refuse what does not fit.
"""

import json
import math
import os
import signal
import sys

import torch
import torch.distributed as dist

import checkpoints
import parallel
from configurator import RENAMED, UserError

# -----------------------------------------------------------------------------
# stop signals

# which configuration keys make a run: a resume (init_from='resume') must share them with its
# checkpoint; the others (num_epochs / latro_steps, out_dir, intervals, most evaluation settings)
# may change. SHAPE_KEYS: a model's shape, checked too when the model was built from scratch
SHAPE_KEYS = {"coconut": ("arch", "n_layer", "n_head", "n_embd", "block_size", "dropout"),
              "latro": ("arch", "n_layer", "n_head", "n_embd", "block_size")}
RESUME_KEYS = {
    "coconut": SHAPE_KEYS["coconut"] + (
        "task", "task_options", "data_path", "split_layout", "n_train", "tokenizer", "seed",
        "method", "c_thought", "epochs_per_stage", "max_latent_stage", "start_stage",
        "pad_latent_to_max", "uniform_prob", "batch_size", "n_val", "max_new_tokens"),
    # the data, what defines the objective and the update, what the rollouts sample and what
    # model selection measures
    "latro": ("task", "data_path", "split_layout", "n_train", "tokenizer", "seed", "prompt",
              "arc_options", "answer_y", "val_split", "batch_size", "rloo_k", "learning_rate",
              "beta", "gamma", "penalty", "sft_coef", "sft_learning_rate", "sft_batch_size",
              "temperature", "top_p", "max_rationale_tokens", "stop_strings", "n_val", "checker",
              "max_new_tokens", "eval_prompt")}

class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (preemption, kill, torchrun) become a flag, so the run stops at a
    step boundary with a checkpoint instead of dying mid-step. A second signal acts at once, as the
    handlers installed before would (KeyboardInterrupt for Ctrl-C, termination for SIGTERM).

        stop = StopRequest()                   # once, in the main thread (Run.__init__ does)
        for step in range(start, max_steps):
            train_step()
            if stop.requested(device):         # under DDP: every rank, at the same step
                ...                            # save, then end (Run.after_step)

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
        if parallel.distributed():
            t = torch.tensor([float(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        return flag

    def restore(self):
        """Put back the handlers that were installed before."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

# -----------------------------------------------------------------------------

class Run:
    """One training run: its processes and device, out_dir, the checkpoint it starts from, its
    saves and its end. Every rank makes one and calls each method at the same point (the saves and
    the stop check are collectives under torchrun)."""

    def __init__(self, script, config, *, resume_keys=None, scratch_keys=None, shape_keys=None,
                 writes=True, results=False):
        """script: 'coconut' or 'latro'. Rank 0 claims out_dir before the process group, so that a
        refusal ends every rank (writes=False: an evaluation; results=True: it writes a results
        file, so out_dir must be writable). The checkpoint
        to start from: out_dir/ckpt.pt for init_from='resume' (this script's, its best.pt whole, the
        same resume_keys, and scratch_keys too when its model was built from scratch), or a .pt
        file of this script given as init_from; else None. self.shape: the model's shape_keys, the
        checkpoint's own when it brings a model (its config's values apply, not this run's)."""
        self.script, self.config, self.out_dir = script, config, config["out_dir"]
        # the tables above unless given: Coconut's checkpoints bring their model's shape (a .pt
        # init_from), LaTRO's scratch shape is checked on resume
        if resume_keys is None:
            resume_keys = RESUME_KEYS.get(script, ())
        if shape_keys is None:
            shape_keys = SHAPE_KEYS[script] if script == "coconut" else ()
        if scratch_keys is None:
            scratch_keys = SHAPE_KEYS[script] if script == "latro" else ()
        self.resuming = config["init_from"] == "resume"
        if int(os.environ.get("RANK", 0)) == 0 and not writes and results:
            checkpoints.check_writable(self.out_dir)
        elif int(os.environ.get("RANK", 0)) == 0 and writes:
            checkpoints.prepare_out_dir(self.out_dir, resume=self.resuming,
                                        overwrite=config["overwrite"], reads=[config["init_from"]])
        elif os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise UserError(f"out_dir {self.out_dir!r} is a file, not a directory: choose another "
                            f"--out_dir")
        self.rank, self.world_size, self.device = parallel.start(config["device"],
                                                                 config["ddp_timeout"])
        self.agree("configuration", config)  # every rank runs the same one
        self.ckpt_path = os.path.join(self.out_dir, checkpoints.CKPT_NAME)
        self.ckpt, self.best = None, -1.0
        if self.resuming:
            self.ckpt = checkpoints.resume_run(self.out_dir, script, resume_keys)
            base = self.ckpt.get("source", self.ckpt.get("base"))
            keys = resume_keys + (scratch_keys if base == "scratch" else ())
            checkpoints.check_same_run(self.ckpt["config"], config, keys, RENAMED)
            self.best = self.ckpt.get("best_val_acc", self.ckpt.get("best_dev_acc", -1.0))
        elif config["init_from"].endswith(".pt"):
            self.ckpt = checkpoints.load_run(config["init_from"], script)
            shape = ", ".join(f"{k} {self.ckpt['config'][k]}" for k in shape_keys)
            parallel.print0(f"model shape from {config['init_from']}: {shape} (the config's values "
                            f"do not apply)")
        self.shape = {k: (self.ckpt or {"config": config})["config"][k] for k in shape_keys}
        self.info = {"script": script, "config": config}  # in every checkpoint of this run
        self.frozen = {}  # {name: module}: weights that every ckpt.pt carries too (LaTRO's π0)
        self.stop = StopRequest()  # Ctrl-C / SIGTERM: a checkpoint at the next step boundary
        # the metrics log, one JSON object a line (rank 0): a resume keeps the lines its
        # checkpoint had seen and appends, so every step is in it exactly once
        self.log_path = os.path.join(self.out_dir, "log.jsonl") if writes else None
        self.log_lines, self._wandb = 0, None
        if self.log_path and self.rank == 0:
            self.log_lines = self.resumed("log_lines")
            checkpoints.keep_lines(self.log_path, self.log_lines)

    def agree(self, what, values):
        """Refuse, on every rank, a run whose ranks hold different `values` ({name: value}, e.g. the
        configuration, or the data sizes and vocabulary), naming the first that differs and both
        values: two nodes started with different config files would otherwise average two
        different trainings."""
        if not parallel.distributed():
            return
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, values)
        for rank, theirs in enumerate(everyone):
            for key in sorted(set(values) | set(theirs)):
                if theirs.get(key) != everyone[0].get(key):
                    raise UserError(f"the ranks differ in their {what}: {key} is "
                                    f"{everyone[0].get(key)!r} on rank 0 and {theirs.get(key)!r} "
                                    f"on rank {rank}: start every rank with the same options and "
                                    f"data")

    def resumed(self, key, default=0):
        """A value of the checkpoint being resumed (where it stands), or `default` for a new run."""
        return self.ckpt.get(key, default) if self.resuming else default

    def restore(self, model, optimizer=None):
        """Load the checkpoint's weights into `model` (sharded or not) and, given one, its optimizer
        state into `optimizer` (this run's learning rate and weight decay kept: the ones it logs),
        and (resume) the RNG where the run left it."""
        optim_sd = self.ckpt["optimizer"] if optimizer is not None else None
        mine = [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] if optimizer else []
        parallel.load_full_state_dicts(model, optimizer, self.ckpt["model"], optim_sd)
        for group, (lr, weight_decay) in zip(optimizer.param_groups if optimizer else [], mine):
            group.update(lr=lr, weight_decay=weight_decay)
        if self.resuming and "rng" in self.ckpt:
            torch.set_rng_state(self.ckpt["rng"])

    # ---- saves

    def save(self, model, optimizer=None, announce=False, **where):
        """ckpt.pt: the weights, the optimizer state, where the run stands (`where`, e.g. epoch and
        step), the best score so far, the RNG and the frozen modules' weights."""
        state = {**self.info, **where, "best_val_acc": self.best, "rng": torch.get_rng_state(),
                 "log_lines": self.log_lines}
        for name, module in self.frozen.items():
            state[name] = None if module is None else parallel.gather_full(module.state_dict())
        checkpoints.save_run(self.ckpt_path, state, model, optimizer)
        if announce:
            parallel.print0(f"saved {self.ckpt_path} at step {where.get('iter_num')}")

    def after_step(self, model, optimizer, label, save=False, announce=False, **where):
        """At a step boundary: ckpt.pt when `save` (a periodic save is due), and on a stop signal
        (on any rank) ckpt.pt then the end of every rank. label: where the run stands, for the
        message ('after step 12')."""
        stopping = self.stop.requested(self.device)
        if save or stopping:
            self.save(model, optimizer, announce=announce, **where)
        if stopping:
            self.exit_on_signal(f"{label}: {self.ckpt_path} saved")

    def keep_best(self, score, model, **entries):
        """best.pt when `score` beats the best so far (model selection on val)."""
        if score > self.best:
            self.best = score
            self.save_weights(checkpoints.BEST_NAME, model, **entries)

    def save_weights(self, name, model, **entries):
        """out_dir/name: the weights alone (best.pt, epoch_N.pt), with what this run is."""
        checkpoints.save_run(os.path.join(self.out_dir, name), {**self.info, **entries}, model)

    def logged(self, key):
        """Every value of `key` in this run's metrics log, in order (rank 0; [] elsewhere): a
        resumed run's log holds each step once, so a count over it is the whole run's."""
        if self.rank != 0 or not self.log_path or not os.path.isfile(self.log_path):
            return []
        with open(self.log_path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [row[key] for row in rows if key in row]

    def write_json(self, name, obj):
        """out_dir/name: a JSON file of results (rank 0), written atomically."""
        if self.rank == 0:
            checkpoints.write_text(os.path.join(self.out_dir, name), json.dumps(obj, indent=1))

    def log(self, metrics, step=None):
        """One line of metrics (rank 0): to out_dir/log.jsonl with its step, and to Weights & Biases
        when wandb_log (imported only then)."""
        if self.rank != 0:
            return
        if self.log_path:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            self.log_lines += 1
        if not self.config.get("wandb_log"):
            return
        if self._wandb is None:
            import wandb
            wandb.init(project=self.config["wandb_project"], name=self.config["wandb_run_name"],
                       config=self.config)
            self._wandb = wandb
        self._wandb.log(metrics, step=step)

    # ---- checks

    def require_finite(self, what, loss, model):
        """Stop before an update whose loss or gradient holds a nan/inf: the loss is summed over the
        ranks and the gradient norm is the synced one, so every rank stops together, and ckpt.pt
        keeps the last good state."""
        gnorm = parallel.grad_norm(model)
        if math.isfinite(loss) and math.isfinite(gnorm):
            return gnorm
        kept = f"{self.ckpt_path} keeps the last good state"
        if not os.path.isfile(self.ckpt_path):
            kept = "no checkpoint was written yet"
        raise UserError(f"{what}: the loss ({loss}) or a gradient (norm {gnorm}) is nan/inf: "
                        f"training diverged; stopped before the update, {kept}; lower the "
                        f"learning rate (or the weight decay)")

    # ---- the end

    def end(self, model):
        """After the training loop: a signal acts at once again, and (DDP) a cheap check that every
        rank holds the same weights (FSDP ranks hold different shards by design)."""
        self.stop.restore()
        if parallel.distributed() and not self.config.get("fsdp"):
            if not parallel.ranks_identical(model):
                raise RuntimeError("ddp: the ranks hold different weights after training (a bug: "
                                   "DDP keeps them identical); nothing after this point is valid")
            parallel.print0(f"ddp: parameters identical on {dist.get_world_size()} ranks: True")

    def export(self, model, tok):
        """out_dir/hf: the weights and the tokenizer as save_pretrained writes them (rank 0; the
        weights gathered whole, a collective under FSDP), for from_pretrained and other tools."""
        checkpoints.save_hf_export(model, tok, os.path.join(self.out_dir, "hf"))

    def load_best(self, model):
        """The run's best.pt weights into `model` on every rank. Returns its other entries."""
        return checkpoints.load_best(model, self.out_dir, self.device)

    def exit_on_signal(self, where):
        """End every rank after a stop signal (the checkpoint is saved): say so, leave the process
        group, exit with 128 + the signal's number, as a process killed by it would report."""
        signum = self.stop.signum or signal.SIGTERM  # (the signal may have reached another rank)
        parallel.print0(f"stopped by {signal.Signals(signum).name} {where}; continue with "
                        f"--init_from=resume")
        self.close()
        sys.exit(128 + signum)

    def close(self):
        """Leave the process group on every rank together."""
        parallel.end_distributed()
