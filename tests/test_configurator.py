"""configurator.configure: overrides, type rules and error messages (each a fault of nanoGPT's original)."""
import pytest

from configurator import ConfigError, configure

def scope():
    return {"lr": 1e-4, "batch_size": 32, "compile": False, "out_dir": "out", "init_from": "scratch",
            "wandb_run_name": None, "__name__": "__main__", "_private": 1}

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
    monkeypatch.setenv("RANK", "1")
    configure(scope(), ["--lr=1"])
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    configure(scope(), ["--lr=1"])
    out = capsys.readouterr().out
    assert "* lr" in out and "batch_size" in out
