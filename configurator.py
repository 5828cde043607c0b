"""
Override a script's configuration globals from config files and --key=value arguments, nanoGPT
style, then check the script's rules:

    python coconut.py config/coconut_prosqa.py --batch_size=64 --out_dir=out/prosqa

At the top of a script, after its defaults (plain int/float/bool/str/None module globals) and its
RULES:

    config = configure(globals(), sys.argv[1:], rules=RULES)  # overrides the globals in place

Differences from nanoGPT's exec-based original, each a fault users hit there:
- a value may contain '=' (--out_dir=runs/lr=1e-4); only the first '=' splits key from value;
- an int is accepted for a float key (--learning_rate=1 means 1.0); a float must be finite;
- a key whose default is None can be set to anything;
- an unknown key is an error naming the closest known keys (a typo never passes silently), or its
  new name when the script renamed it;
- a wrong type is an error naming the key, the expected type and the value;
- only rank 0 prints, so an 8-GPU run logs its configuration once.

Rules are data: (condition, message) pairs, a Python expression over the config's keys (and the
script's globals, `world_size` and `distributed` of the launch) that must hold, and the error that
says what to do otherwise, an f-string over the same names. They are checked in order before any
work; the first one that fails is the error.

User errors: a mistake in the user's input (a config key, a data file, an out_dir, a checkpoint
that does not fit) is raised as a UserError. A script calls exit_cleanly_on_user_error() once at
its start; from then on an uncaught UserError prints one line `error: <message>` and exits with
status 1, without a traceback, while any other exception (a bug) keeps its full traceback.
"""

import ast
import difflib
import math
import os
import re
import sys
from importlib.util import find_spec

TYPES = (bool, int, float, str, type(None))

class UserError(ValueError):
    """A mistake in the user's input: the message says what is wrong and what to do. Reported as
    one line without a traceback once exit_cleanly_on_user_error() is installed. A ValueError, so
    `except ValueError` still catches it."""

class ConfigError(UserError):
    """A wrong config key, value or config file."""

def exit_cleanly_on_user_error():
    """Install a sys.excepthook: an uncaught UserError prints `error: <message>` to stderr and the
    process exits with status 1 (atexit handlers, e.g. the out_dir lock release, still run); any
    other exception goes to the hook installed before (the normal traceback). Under torchrun every
    rank that fails prints, rank 0 as `error: ...` and the others as `[rank N] error: ...`: an
    error that only one rank meets is never lost."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if not issubclass(kind, UserError):
            previous(kind, value, tb)
            return
        rank = int(os.environ.get("RANK", "0"))
        prefix = "" if rank == 0 else f"[rank {rank}] "
        sys.stderr.write(f"{prefix}error: {value}\n")
        sys.stderr.flush()

    sys.excepthook = hook

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
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        if raw is not None:
            return raw  # --out_dir=123: a string key keeps the text as written
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

# -----------------------------------------------------------------------------
# rules

def each(keys, condition, message):
    """One rule per key: `condition` and `message` with {key} for the key's name and {value} (or
    {value!r}) for its value, e.g. each('batch_size n_layer', '{key} > 0', '{key}={value} > 0')."""
    rules = []
    for k in keys.split():
        value = "{" + k  # '{value}' -> '{batch_size}', '{value!r}' -> '{batch_size!r}'
        rules.append((condition.replace("{key}", k),
                      message.replace("{key}", k).replace("{value", value)))
    return rules

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

def system_rules(script):
    """The rules on the launch and the machine that both scripts share (device, seed, FSDP,
    wandb)."""
    return [
        ("device in ('auto', 'cpu') or re.fullmatch(r'cuda(:\\d+)?', device)",
         "device={device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ("not device.startswith('cuda') or torch.cuda.is_available()",
         "device={device!r} but this torch sees no CUDA GPU: use --device=cpu or 'auto'"),
        ("0 <= seed < 2**32", "seed={seed}: give a seed in [0, 2**32)"),
        ("not fsdp or distributed", "fsdp=True shards over the processes of a torchrun launch: "
         f"start with torchrun --nproc_per_node=N {script} ..., or drop --fsdp=True"),
        ("not wandb_log or find_spec('wandb')",
         "wandb_log=True but wandb is not installed: pip install wandb, or --wandb_log=False"),
    ]

def launch():
    """The names a rule may use about the launch: torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT together; one without the others (a stale RANK in the shell) is an error here, not
    a hang or a traceback in init_process_group."""
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    set_ = [k for k, v in env.items() if v is not None]
    if set_ and len(set_) < len(env):
        missing = [k for k, v in env.items() if v is None]
        raise ConfigError(f"{', '.join(set_)} set but {', '.join(missing)} not: launch with "
                          f"torchrun (it sets them all), or unset {', '.join(set_)} for one "
                          f"process")
    return {"world_size": int(env["WORLD_SIZE"] or 1), "distributed": env["RANK"] is not None}

def check_rules(rules, names):
    """Raise a ConfigError with the message of the first rule whose condition is false. names: the
    config and whatever else the conditions and messages use (a script's globals, launch())."""
    scope = {"suggest": suggest, "literal": literal, "counts": counts, "re": re, "difflib": difflib,
             "find_spec": find_spec, **names}
    for condition, message in rules:
        if not eval(condition, scope):
            raise ConfigError(eval("f" + repr(message), scope))

# -----------------------------------------------------------------------------

def read_config_file(path, defaults, renamed):
    """The key updates of one config file (a Python file of assignments)."""
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a directory: give a .py file of assignments")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found (positional arguments are config "
                          f"files; options are written --key=value)")
    namespace = {}
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path!r} is not UTF-8 text (byte {e.start}: "
                          f"{e.object[e.start:e.start + 1]!r}): save it as UTF-8") from None
    try:
        exec(compile(source, path, "exec"), namespace)
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

def configure(scope, argv, verbose=None, renamed=None, rules=()):
    """Apply config files (positional arguments, in order) then --key=value arguments to `scope` (a
    script's globals()), then check `rules` (see check_rules). Returns {key: value} of every
    configuration global, in definition order. renamed: {old key: new key}, so that an old name is
    refused with its new one."""
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
    check_rules(rules, {**scope, **launch()})
    return config
