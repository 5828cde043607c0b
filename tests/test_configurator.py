"""configurator.configure: overrides, type rules and error messages (each a fault of nanoGPT's
original)."""
import os
import subprocess
import sys

import pytest

from configurator import ConfigError, UserError, configure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def scope():
    return {"lr": 1e-4, "batch_size": 32, "compile": False, "out_dir": "out",
            "init_from": "scratch", "wandb_run_name": None, "__name__": "__main__", "_private": 1}

def test_overrides_and_returned_config():
    g = scope()
    cfg = configure(g, ["--lr=3e-4", "--batch_size=64", "--compile=True"], verbose=False)
    assert (g["lr"], g["batch_size"], g["compile"]) == (3e-4, 64, True)
    # only plain public globals are configuration
    assert list(cfg) == ["lr", "batch_size", "compile", "out_dir", "init_from", "wandb_run_name"]

def test_value_may_contain_equals():
    g = scope()
    configure(g, ["--out_dir=runs/lr=1e-4,bs=32"], verbose=False)
    assert g["out_dir"] == "runs/lr=1e-4,bs=32"

def test_int_accepted_for_float_key():
    g = scope()
    configure(g, ["--lr=1"], verbose=False)
    assert g["lr"] == 1.0 and isinstance(g["lr"], float)

def test_none_default_can_be_set():
    g = scope()
    configure(g, ["--wandb_run_name=run7"], verbose=False)
    assert g["wandb_run_name"] == "run7"

def test_lowercase_bool_and_numeric_text_for_str_key():
    g = scope()
    configure(g, ["--compile=false", "--out_dir=123"], verbose=False)
    assert g["compile"] is False and g["out_dir"] == "123"

def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'batchsize'.*batch_size"):
        configure(scope(), ["--batchsize=3"], verbose=False)

def test_wrong_type_names_key_type_value():
    with pytest.raises(ConfigError, match=r"'batch_size' expects int .* got float 0.5"):
        configure(scope(), ["--batch_size=0.5"], verbose=False)
    with pytest.raises(ConfigError, match=r"'compile' expects bool"):
        configure(scope(), ["--compile=1"], verbose=False)

def test_missing_value_and_missing_file():
    with pytest.raises(ConfigError, match="--lr=VALUE"):
        configure(scope(), ["--lr"], verbose=False)
    with pytest.raises(ConfigError, match="not found"):
        configure(scope(), ["nope/config.py"], verbose=False)

def test_config_file_then_args(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("import math\nlr = 2 * math.pi\nbatch_size = 8\n")
    g = scope()
    configure(g, [str(f), "--batch_size=16"], verbose=False)
    assert g["lr"] == pytest.approx(6.283185307) and g["batch_size"] == 16
    f.write_text("learning_rate = 1e-3\n")
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'"):
        configure(scope(), [str(f)], verbose=False)

def test_prints_only_on_rank0(capsys, monkeypatch):
    for var, value in (("WORLD_SIZE", "2"), ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(var, value)                                 # as torchrun sets them
    monkeypatch.setenv("RANK", "1")
    configure(scope(), ["--lr=1"])
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    configure(scope(), ["--lr=1"])
    out = capsys.readouterr().out
    assert "* lr" in out and "batch_size" in out

def test_bool_for_number_private_and_module_names_are_refused():
    g = {**scope(), "os": os}
    cases = [("--batch_size=True", "'batch_size' expects int"),
             ("--lr=False", "'lr' expects float"),
             ("--_private=2", "unknown config key '_private'"),
             ("--os=1", "unknown config key 'os'")]
    for arg, message in cases:
        with pytest.raises(ConfigError, match=message):
            configure(g, [arg], verbose=False)
    assert g["_private"] == 1 and g["os"] is os and g["batch_size"] == 32  # nothing was applied

def test_config_file_that_fails_names_the_file(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("lr = 1e-3\nbatch_size = = 4\n")
    with pytest.raises(ConfigError, match=r"bad.py' line 2 failed: SyntaxError"):
        configure(scope(), [str(f)], verbose=False)
    f.write_text("lr = base_lr * 2\n")
    with pytest.raises(ConfigError, match=r"bad.py' failed: NameError: name 'base_lr'"):
        configure(scope(), [str(f)], verbose=False)

def test_config_error_is_a_user_error_and_a_value_error():
    assert issubclass(ConfigError, UserError) and issubclass(UserError, ValueError)

SCRIPT = """
import sys
from configurator import UserError, exit_cleanly_on_user_error
exit_cleanly_on_user_error()
if sys.argv[1] == "user":
    raise UserError("out_dir 'x' is a file")
raise ZeroDivisionError("a bug")
"""

@pytest.mark.parametrize("rank, prefix", [("0", "error: "), ("1", "[rank 1] error: ")])
def test_user_error_is_one_line_and_a_bug_keeps_its_traceback(rank, prefix):
    env = {**os.environ, "PYTHONPATH": ROOT, "RANK": rank}
    r = subprocess.run([sys.executable, "-c", SCRIPT, "user"], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == prefix + "out_dir 'x' is a file\n"  # one line, no traceback
    r = subprocess.run([sys.executable, "-c", SCRIPT, "bug"], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 1
    assert r.stderr.startswith("Traceback") and r.stderr.endswith("ZeroDivisionError: a bug\n")

def test_renamed_key_is_refused_with_its_new_name(tmp_path):
    """An old key name (from before both scripts shared one vocabulary) is an error that gives the
    new name, from a config file and from the command line."""
    with pytest.raises(ConfigError, match="'lr' is now called 'learning_rate'"):
        configure({"learning_rate": 1.0}, ["--lr=0.1"], verbose=False,
                  renamed={"lr": "learning_rate"})
    (tmp_path / "old.py").write_text("lr = 0.1\n")
    with pytest.raises(ConfigError, match="'lr' is now called 'learning_rate'"):
        configure({"learning_rate": 1.0}, [str(tmp_path / "old.py")], verbose=False,
                  renamed={"lr": "learning_rate"})
    with pytest.raises(ConfigError, match="unknown config key 'lr'"):
        configure({"learning_rate": 1.0}, ["--lr=0.1"], verbose=False)


def test_ctrl_c_where_a_run_has_no_stop_to_make_is_one_line():
    # a KeyboardInterrupt (a second Ctrl-C, or one before the run's stop handler) ends the process
    # with one line and the status of a Ctrl-C, not a traceback
    script = ("from configurator import exit_cleanly_on_user_error\n"
              "exit_cleanly_on_user_error()\nraise KeyboardInterrupt\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode in (130, -2)                       # 128 + SIGINT, as a killed process
    assert r.stderr == "error: interrupted (Ctrl-C): stopped at once; a ckpt.pt written before " \
                       "is kept\n"
