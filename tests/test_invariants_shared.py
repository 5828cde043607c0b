"""Shared-module invariants that single-line bugs break: sampling draws from softmax(logits / T)
with the caller's generator, a finished row only pads, and config-file helper names."""
import pytest
import torch

from configurator import ConfigError, configure
from model import decode, ends_with_stop, load_model, prefill, sample_next


def test_sampling_draws_from_softmax_of_logits_over_temperature():
    """sample_next at temperature T is torch.multinomial over softmax(logits / T) with the same
    generator: the same draws, row by row; T = 0 is argmax."""
    torch.manual_seed(0)
    logits = torch.randn(64, 7)
    for T in (0.5, 1.0, 2.0):
        got = sample_next(logits, T, 1.0, torch.Generator().manual_seed(1))
        probs = (logits / T).softmax(-1)
        want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(1)).squeeze(-1)
        assert torch.equal(got, want), T
        assert not torch.equal(got, logits.argmax(-1))  # sampling, not greedy
    assert torch.equal(sample_next(logits, 0, 1.0, None), logits.argmax(-1))


def test_a_finished_row_only_pads_while_the_others_keep_decoding():
    """decode: once a row is finished (here by stop_check after its first token) every later token
    of it is pad_id; the unfinished row runs to max_new_tokens."""
    torch.manual_seed(0)
    m = load_model("scratch", 20, arch="gpt2", n_layer=1, n_head=2, n_embd=16, block_size=32,
                   eos_id=1, pad_id=0)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(6.0 if p.dim() > 1 else 1.0)
    ids, mask = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.ones(2, 3, dtype=torch.long)
    last, cache = prefill(m.eval(), ids, mask)
    first_only = lambda tokens, finished: torch.tensor([True, False])  # row 0 ends at once
    tokens, stopped = decode(m, last, cache, mask, 5, stop_sequences=[], pad_id=0, temperature=1.0,
                             generator=torch.Generator().manual_seed(0), stop_check=first_only)
    assert tokens.shape == (2, 5) and stopped.tolist() == [True, False]
    assert tokens[0, 1:].tolist() == [0] * 4 and tokens[0, 0].item() != 0 and (tokens[1] != 0).any()


def test_config_file_may_use_private_helper_names_and_modules(tmp_path):
    """In a config file, names starting with '_' and imported modules are the file's own helpers,
    not keys; the keys it sets get the defaults' types (an int for a float key becomes a float)."""
    f = tmp_path / "preset.py"
    f.write_text("import math\n_base = 3\nn = _base * 2\nlr = math.floor(2.5)\n")
    cfg = configure({"n": 1, "lr": 0.5, "flag": False}, [str(f), "--flag=true"], verbose=False)
    assert cfg == {"n": 6, "lr": 2.0, "flag": True} and type(cfg["lr"]) is float
    f.write_text("n = True\n")  # a bool is not an int (True == 1 in Python)
    with pytest.raises(ConfigError, match="'n' expects int"):
        configure({"n": 1}, [str(f)], verbose=False)


def test_a_multi_token_stop_matches_only_the_whole_sequence_at_the_end():
    """ends_with_stop: a row stops when its last n tokens equal an n-token stop, all of them; a row
    sharing one token with it, or holding it earlier, does not stop."""
    tokens = torch.tensor([[9, 4, 5], [9, 7, 5], [9, 4, 7], [4, 5, 7], [7, 7, 8]])
    assert ends_with_stop(tokens, [[4, 5]]).tolist() == [True, False, False, False, False]
    assert ends_with_stop(tokens, [[4, 5], [8]]).tolist() == [True, False, False, False, True]
    assert ends_with_stop(tokens, [[1, 2, 3, 4]]).tolist() == [False] * 5  # longer than the rows
    # several one-token stops (compared at once): only the last token counts
    assert ends_with_stop(tokens, [[8], [7], [4]]).tolist() == [False, False, True, True, True]
