"""
Override a script's configuration globals from config files and --key=value arguments, nanoGPT
style, then check them before any work:

    python coconut.py config/coconut_prosqa.py --batch_size=64 --out_dir=out/prosqa

A script calls, once its defaults (plain int/float/bool/str/None module globals) are defined:

    config = configurator.configure(globals(), sys.argv[1:], choices=CHOICES, bounds=BOUNDS,
                                    check=check_config)

Differences from nanoGPT's original, each a fault users hit there:
- a value may contain '=' (--out_dir=runs/lr=1e-4); only the first '=' splits key from value;
- an int is accepted for a float key (--learning_rate=1 means 1.0); a float must be finite;
- a key whose default is None can be set to anything;
- an unknown key is an error naming the closest known keys (a typo never passes silently), or its
  new name when it was renamed (RENAMED);
- a wrong type is an error naming the key, the expected type and the value;
- only rank 0 prints, so an 8-GPU run logs its configuration once.

The checks, in this order, the first that fails being the error:
- what each key may hold, given by the script as plain data: `choices` ({key: allowed values})
  and `bounds` ({"key key ...": "> 0" | ">= 0" | "[0, 1)" ...}, `notes` adding a word on a key);
- the rules on the launch and the machine that both scripts share (check_system);
- each script's bookkeeping rules across keys (check_coconut_keys, check_latro_keys);
- the script's own rules across keys: `check(c, world_size)`, plain Python with c.key for each key.

User errors: a mistake in the user's input (a config key, a data file, an out_dir, a checkpoint
that does not fit) is raised as a UserError. configure() installs exit_cleanly_on_user_error():
from then on an uncaught UserError prints one line `error: <message>` and exits with status 1,
without a traceback, while any other exception (a bug) keeps its full traceback.
"""

import ast
import difflib
import math
import os
import re
import runpy
import sys
from importlib.util import find_spec
from types import SimpleNamespace

import formats

TYPES = (bool, int, float, str, type(None))
# what a bound's message adds about a key, in both scripts
NOTES = {"n_train": "0 = the task's default size", "n_val": "0 = the task's default size",
         "n_test": "0 = the task's default size"}
# the keys' former names, in both scripts: an old name is refused with its new one
RENAMED = {"lr": "learning_rate", "sft_lr": "sft_learning_rate", "n_dev": "n_val",
           "ddp_timeout_s": "ddp_timeout", "eval_max_tokens": "max_new_tokens"}

class UserError(ValueError):
    """A mistake in the user's input: the message says what is wrong and what to do. Reported as
    one line without a traceback once exit_cleanly_on_user_error() is installed. A ValueError, so
    `except ValueError` still catches it."""

class ConfigError(UserError):
    """A wrong config key, value or config file."""

def exit_cleanly_on_user_error():
    """Install a sys.excepthook: an uncaught UserError prints `error: <message>` to stderr and the
    process exits with status 1 (atexit handlers, e.g. the out_dir lock release, still run); an
    uncaught KeyboardInterrupt prints one line too (the status is a Ctrl-C's); any other
    exception goes to the hook installed before (the normal traceback). Under torchrun every
    rank that fails prints, rank 0 as `error: ...` and the others as `[rank N] error: ...`: an
    error that only one rank meets is never lost."""
    previous = sys.excepthook
    if getattr(previous, "one_line_user_errors", False):
        return  # installed already

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):  # Ctrl-C where the run has no stop to make
            value = "interrupted (Ctrl-C): stopped at once; a ckpt.pt written before is kept"
        elif not issubclass(kind, UserError):
            previous(kind, value, tb)
            return
        rank = int(os.environ.get("RANK", "0"))
        prefix = "" if rank == 0 else f"[rank {rank}] "
        sys.stderr.write(f"{prefix}error: {value}\n")
        sys.stderr.flush()

    hook.one_line_user_errors = True
    sys.excepthook = hook

# -----------------------------------------------------------------------------
# reading the overrides

def parse_value(text):
    """'3' -> 3, '1e-4' -> 0.0001, 'True' -> True, 'None' -> None, other text -> the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text

def check_type(key, default, value, raw=None):
    """The value converted to the type of the default, or a ConfigError saying what was expected."""
    if default is None:
        return value  # a None default means "unset": any value is fine
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}={float(value)}: give a finite number")
            if value == 0 and raw is not None and any(c in "123456789" for c in raw.split("e")[0]):
                raise ConfigError(f"{key}={raw} is below the smallest float and would read as 0.0: "
                                  f"give a number a float can hold")
            return float(value)
    elif isinstance(default, str):
        if not isinstance(value, str) and raw is not None:
            value = raw  # --out_dir=123: a string key keeps the text as written
        if isinstance(value, str):
            # a path written with ~ (the shell expands it only at the start of a word)
            return os.path.expanduser(value) if value.startswith("~") else value
    raise ConfigError(f"config key {key!r} expects {type(default).__name__} (default {default!r}), "
                      f"got {type(value).__name__} {value!r}")

def unknown_key_error(key, known, renamed=None):
    if renamed and key in renamed:
        return ConfigError(f"config key {key!r} is now called {renamed[key]!r} (one name in both "
                           f"scripts): write {renamed[key]} instead")
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"; known keys: {', '.join(sorted(known))}"
    if close:
        hint = f"; did you mean {', '.join(close)}?"
    return ConfigError(f"unknown config key {key!r}{hint}")

def read_config_file(path, defaults, renamed):
    """The key updates of one config file: a Python file of assignments (it may compute values and
    define helpers), run in its own namespace as nanoGPT's configurator runs it."""
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a directory: give a .py file of assignments")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found (positional arguments are config "
                          f"files; options are written --key=value)")
    try:
        with open(path, encoding="utf-8") as f:
            f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path!r} is not UTF-8 text (byte {e.start}: "
                          f"{e.object[e.start:e.start + 1]!r}): save it as UTF-8") from None
    try:
        namespace = runpy.run_path(path, run_name="__config__")
    except SystemExit as e:  # a config file ends nothing: its run would end with no word
        raise ConfigError(f"config file {path!r} called sys.exit({e.code!r}): a config file only "
                          f"assigns keys") from None
    except Exception as e:
        # the user's file: say which one and what failed, not a traceback into this module
        where = f" line {e.lineno}" if isinstance(e, SyntaxError) else ""
        raise ConfigError(f"config file {path!r}{where} failed: {type(e).__name__}: {e}") from e
    updates = {}
    for key, value in namespace.items():
        # the file's own helpers: private names, imported modules, functions and classes
        if key.startswith("_") or type(value).__name__ == "module" or callable(value):
            continue
        if key not in defaults:
            raise unknown_key_error(key, defaults, renamed)
        updates[key] = check_type(key, defaults[key], value)
    return updates

# -----------------------------------------------------------------------------
# the checks

def suggest(value, known):
    """'did you mean X?' for a near miss, else the list of known values."""
    close = difflib.get_close_matches(value, known, n=1)
    if close:
        return f"did you mean {close[0]}?"
    return f"known: {', '.join(known)}"

def literal(text):
    """The Python literal a text spells ('{"a": 1}' -> a dict), or None."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None

def counts(text):
    """'0,1,2' -> [0, 1, 2]: counts >= 0 separated by commas (coconut.py's thoughts_sweep); None
    when the text is not that."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        return None
    return values if values and min(values) >= 0 else None

def within(value, bound):
    """Does a number satisfy a bound: '> 0', '>= -1', or an interval '[0, 1]', '[0, 1)' ...?"""
    if bound[0] in "[(":
        low, high = (float(x) for x in bound[1:-1].split(","))
        above = value > low if bound[0] == "(" else value >= low
        below = value < high if bound[-1] == ")" else value <= high
        return above and below
    op, limit = bound.split()
    return value > float(limit) if op == ">" else value >= float(limit)

def check_limits(config, choices=None, bounds=None, notes=None):
    """What each key may hold, as plain data: choices {key: allowed values} (a list of more than six
    is not printed: the closest value is suggested), then bounds {"key key ...": bound} (within()'s
    bounds). notes {key: text}: why a value is allowed (printed after the bound)."""
    for key, allowed in (choices or {}).items():
        value = config[key]
        if value in allowed:
            continue
        if len(allowed) > 6:
            raise ConfigError(f"{key}={value!r} is unknown; {suggest(value, allowed)}")
        raise ConfigError(f"{key}={value!r}: use one of {', '.join(map(repr, allowed))}")
    for keys, bound in (bounds or {}).items():
        for key in keys.split():
            if not within(config[key], bound):
                what = f"in {bound}" if bound[0] in "[(" else bound
                note = {**NOTES, **(notes or {})}.get(key)
                note = f" ({note})" if note else ""
                raise ConfigError(f"{key}={config[key]}: give a value {what}{note}")

def check_system(c, script, distributed, own_checkpoints=False):
    """The rules both scripts share: the launch and the machine (c.device, c.seed, c.fsdp,
    c.wandb_log), out_dir and init_from, the shape of a model from scratch. own_checkpoints: the
    script starts from .pt files of its own (coconut.py)."""
    if not (c.device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", c.device)):
        raise ConfigError(f"device={c.device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if c.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ConfigError(f"device={c.device!r} but this torch sees no CUDA GPU: use "
                              f"--device=cpu or 'auto'")
    if not 0 <= c.seed < 2**32:
        raise ConfigError(f"seed={c.seed}: give a seed in [0, 2**32)")
    if c.fsdp and not distributed:
        raise ConfigError(f"fsdp=True shards over the processes of a torchrun launch: start with "
                          f"torchrun --nproc_per_node=N {script} ..., or drop --fsdp=True")
    if c.wandb_log and not find_spec("wandb"):
        raise ConfigError("wandb_log=True but wandb is not installed: pip install wandb, or "
                          "--wandb_log=False")
    # AdamW multiplies every weight by (1 - lr x wd) at each step: from 1 on, zeroed or flipped
    if c.learning_rate * c.weight_decay >= 1:
        raise ConfigError(f"learning_rate x weight_decay = {c.learning_rate * c.weight_decay:g} "
                          f">= 1: AdamW's decay (each weight times 1 - lr x wd per step) would "
                          f"zero or flip every weight; lower weight_decay")
    # AdamW's first step is lr / (1 - beta1) = 10 x lr (times a unit step): it must fit a float32
    if c.learning_rate * 10 > 3.4e38:
        raise ConfigError(f"learning_rate={c.learning_rate:g}: AdamW's first step (10 x the "
                          f"learning rate) does not fit a float32; give a learning rate below 3e37")
    if c.init_from == "resume" and c.overwrite:
        raise ConfigError("init_from='resume' continues out_dir's checkpoint and overwrite=True "
                          "deletes it: choose one")
    if c.init_from == "scratch" and c.n_embd % c.n_head:
        raise ConfigError(f"n_embd={c.n_embd} is not a multiple of n_head={c.n_head}")
    pt = own_checkpoints and c.init_from.endswith(".pt")
    if pt and not os.path.isfile(c.init_from):
        raise ConfigError(f"init_from={c.init_from!r}: no such checkpoint file")
    named = pt or c.init_from in ("scratch", "resume") or c.init_from.lower().endswith(".gguf")
    if named or not os.path.isfile(c.init_from):
        return
    if own_checkpoints:
        raise ConfigError(f"init_from={c.init_from!r} is a file but not a .pt checkpoint: give a "
                          f".pt file of {script}, a save_pretrained directory or a hub name")
    raise ConfigError(f"init_from={c.init_from!r} is a file; give a directory written by "
                      f"save_pretrained, a hub name, 'scratch' or 'resume'")

# -----------------------------------------------------------------------------
# each script's bookkeeping rules across keys (the rules that teach the method stay in the script,
# its check_config, after the method)

def check_coconut_keys(c):
    """coconut.py: values that parse, runs that train or evaluate something, a pretrained model's
    learning rate."""
    if not isinstance(literal(c.task_options), dict):
        raise UserError(f"task_options={c.task_options!r} must be a dict literal, e.g. "
                        f"\"{{'min_hops': 2}}\" or \"{{}}\"")
    if c.num_epochs <= 0 and not c.eval_only:
        raise UserError(f"num_epochs={c.num_epochs} must be > 0 (eval_only=True evaluates without "
                        f"training)")
    if c.eval_only and c.init_from == "scratch":
        raise UserError("eval_only=True with init_from='scratch' would score an untrained model: "
                        "give --init_from=resume, a .pt checkpoint or a trained model")
    if c.thoughts_sweep and not counts(c.thoughts_sweep):
        raise UserError(f"thoughts_sweep={c.thoughts_sweep!r}: give thought counts >= 0 separated "
                        f"by commas, e.g. 0,1,2,3")
    # the demo's learning rate is for a tiny model from scratch: far too high for a pretrained one
    pretrained = c.init_from not in ("scratch", "resume") and not c.init_from.endswith(".pt")
    if pretrained and not c.eval_only and "learning_rate" not in c.given:
        raise UserError(f"init_from={c.init_from!r} is a pretrained model and learning_rate="
                        f"{c.learning_rate:g} is the CPU demo's (a tiny model from scratch): give "
                        f"--learning_rate (paper: 1e-4 for GPT-2), or start from a preset in "
                        f"config/")

def check_latro_keys(c):
    """latro.py: stop strings, the prompts a task has, runs that train something, a pretrained
    model's learning rates."""
    if c.stop_strings != "released" and difflib.get_close_matches(c.stop_strings, ["released"],
                                                                  cutoff=0.75):
        raise UserError(f"stop_strings={c.stop_strings!r}: did you mean 'released'? (to stop at "
                        f"that text, write it as '{c.stop_strings}|' )")
    if not all(s.strip() for s in formats.parse_stop_strings(c.stop_strings)):
        raise UserError(f"stop_strings={c.stop_strings!r} holds a blank stop string: it would cut "
                        f"every rationale at the first space; separate real strings with '|'")
    if c.pre_experiment and c.init_from in ("scratch", "resume"):
        raise UserError("pre_experiment=True scores a trained model: give --init_from=<a "
                        "save_pretrained directory, e.g. out/latro/hf>")
    if c.eval_prompt == "8shot" and c.task != "gsm8k":
        raise UserError("the 8-shot prompt is GSM8K's, for evaluation: use --eval_prompt=8shot "
                        "with --task=gsm8k")
    words = c.tokenizer == "words" or not c.tokenizer and c.init_from == "scratch"  # (vocab's rule)
    if c.eval_prompt == "8shot" and words:
        raise UserError("eval_prompt=8shot needs a model's own tokenizer: the word vocabulary of a "
                        "model from scratch does not hold the words of its eight worked examples")
    # the demo's warm-up and learning rates are for a tiny model from scratch: a pretrained model
    # gets them only when asked for (the paper's LaTRO runs no warm-up, at lr 5e-7)
    pretrained = c.init_from not in ("scratch", "resume") and not c.pre_experiment
    chosen = "learning_rate" in c.given and ("sft_steps" in c.given or "sft_epochs" in c.given)
    if pretrained and not chosen:
        raise UserError(f"init_from={c.init_from!r} is a pretrained model and the defaults are the "
                        f"CPU demo's (a tiny model from scratch: an SFT warm-up of {c.sft_steps} "
                        f"steps at {c.sft_learning_rate:g}, then learning_rate="
                        f"{c.learning_rate:g}): give --learning_rate (paper: 5e-7) and --sft_steps "
                        f"(0: no warm-up, as the paper), or start from config/latro_gsm8k.py")
    # runs that would report an untrained model
    if c.init_from == "scratch" and not (c.sft_steps or c.sft_epochs or c.latro_steps):
        raise UserError("init_from='scratch' with no SFT warm-up (sft_steps=0) and latro_steps=0 "
                        "trains nothing: the test accuracy would be a random model's; set "
                        "sft_steps or latro_steps, or evaluate a trained model with evaluate.py")

SCRIPT_KEYS = {"coconut.py": check_coconut_keys, "latro.py": check_latro_keys}

def launch():
    """(world_size, distributed) of the launch: torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT together; one without the others (a stale RANK in the shell) is an error here, not
    a hang or a traceback in init_process_group."""
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    set_ = [k for k, v in env.items() if v is not None]
    if set_ and len(set_) < len(env):
        missing = [k for k, v in env.items() if v is None]
        raise ConfigError(f"{', '.join(set_)} set but {', '.join(missing)} not: launch with "
                          f"torchrun (it sets them all), or unset {', '.join(set_)} for one "
                          f"process")
    return int(env["WORLD_SIZE"] or 1), env["RANK"] is not None

def run_checks(config, world_size=1, distributed=False, *, choices=None, bounds=None, notes=None,
               check=None, script="", own_checkpoints=False, given=None):
    """Every check of a script's configuration, in order: the per-key limits, the rules both
    scripts share (check_system), the script's bookkeeping rules (SCRIPT_KEYS) and the script's
    own `check(c, world_size)`."""
    check_limits(config, choices, bounds, notes)
    if check is None:
        return
    # c.given: the keys a config file or an argument set (None: every key counts as given)
    c = SimpleNamespace(**config, given=set(config) if given is None else set(given))
    check_system(c, script, distributed, own_checkpoints)
    if script in SCRIPT_KEYS:
        SCRIPT_KEYS[script](c)
    check(c, world_size)

def configure(scope, argv, verbose=None, renamed=None, **checks):
    """Apply config files (positional arguments, in order) then --key=value arguments to `scope` (a
    script's globals()), then check them (checks: run_checks()'s keywords). Returns {key: value} of
    every configuration global, in definition order. renamed: {old key: new key} (RENAMED), so that
    an old name is refused with its new one. Installs exit_cleanly_on_user_error() first."""
    exit_cleanly_on_user_error()
    defaults = {k: v for k, v in scope.items() if not k.startswith("_") and isinstance(v, TYPES)}
    if verbose is None:
        verbose = int(os.environ.get("RANK", "0")) == 0
    updates = {}
    for arg in argv:
        if not arg.startswith("--"):
            updates.update(read_config_file(arg, defaults, renamed))
            if verbose:
                print(f"config file {arg}")
            continue
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            raise ConfigError(f"argument {arg!r} has no value: write --{key}=VALUE")
        if key not in defaults:
            raise unknown_key_error(key, defaults, renamed)
        updates[key] = check_type(key, defaults[key], parse_value(raw), raw)
    scope.update(updates)
    config = {k: scope[k] for k in defaults}
    if verbose:
        width = max(map(len, config), default=0)
        print("configuration (* = overridden):")
        for k, v in config.items():
            print(f"  {'*' if k in updates else ' '} {k:<{width}} = {v!r}")
    world_size, distributed = launch()
    script = os.path.basename(scope.get("__file__") or "")
    run_checks(config, world_size, distributed, script=script, given=updates, **checks)
    return config
