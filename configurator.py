"""
Override a script's configuration globals from config files and --key=value arguments, nanoGPT style:

    python coconut.py config/coconut_prosqa.py --batch_size=64 --out_dir=out/prosqa

At the top of a script, after its defaults (plain int/float/bool/str/None module globals):

    from configurator import configure
    config = configure(globals(), sys.argv[1:])  # overrides the globals in place, returns the effective config

Differences from nanoGPT's exec-based original, each a fault users hit there:
- a value may contain '=' (--out_dir=runs/lr=1e-4); only the first '=' splits key from value;
- an int is accepted for a float key (--lr=1 means 1.0);
- a key whose default is None can be set to anything;
- an unknown key is an error naming the closest known keys (a typo never passes silently), or its
  new name when the script renamed it;
- a wrong type is an error naming the key, the expected type and the value;
- only rank 0 prints, so an 8-GPU run logs its configuration once.

User errors: a mistake in the user's input (a config key, a data file, an out_dir, a checkpoint
that does not fit) is raised as a UserError. A script calls exit_cleanly_on_user_error() once at
its start; from then on an uncaught UserError prints one line `error: <message>` and exits with
status 1, without a traceback, while any other exception (a bug) keeps its full traceback.
"""

import ast
import difflib
import os
import sys

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
    """'3' -> 3, '1e-4' -> 0.0001, 'True' -> True, 'None' -> None, anything that is not a literal -> the string."""
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
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        if raw is not None:
            return raw  # --out_dir=123 or --init_from=None-like text: a string key keeps the text as written
    raise ConfigError(f"config key {key!r} expects {type(default).__name__} (default {default!r}), "
                      f"got {type(value).__name__} {value!r}")

def unknown_key_error(key, known, renamed=None):
    if renamed and key in renamed:
        return ConfigError(f"config key {key!r} is now called {renamed[key]!r} (one name in both scripts): "
                           f"write {renamed[key]} instead")
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key {key!r}{hint}")

def configure(scope, argv, verbose=None, renamed=None):
    """Apply config files (positional arguments, in order) then --key=value arguments to `scope` (a script's
    globals()). Returns {key: value} of every configuration global, in definition order.
    renamed: {old key: new key}, so that an old name is refused with its new one."""
    defaults = {k: v for k, v in scope.items() if not k.startswith("_") and isinstance(v, TYPES)}
    if verbose is None:
        verbose = int(os.environ.get("RANK", "0")) == 0
    updates = {}
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg!r} not found (positional arguments are config files; "
                                  f"options are written --key=value)")
            namespace = {}
            with open(arg) as f:
                source = f.read()
            try:
                exec(compile(source, arg, "exec"), namespace)
            except Exception as e:
                # the user's file: say which one and what failed, not a traceback into this module
                where = f" line {e.lineno}" if isinstance(e, SyntaxError) else ""
                problem = f"{type(e).__name__}: {e}"
                raise ConfigError(f"config file {arg!r}{where} failed: {problem}") from e
            for key, value in namespace.items():
                if key.startswith("_") or type(value).__name__ == "module":
                    continue
                if key not in defaults:
                    raise unknown_key_error(key, defaults, renamed)
                updates[key] = check_type(key, defaults[key], value)
            if verbose:
                print(f"config file {arg}")
        else:
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
    return config
