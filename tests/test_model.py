"""model.py: loading, target log-probs and KV-cached decoding."""
import inspect
import logging
import warnings

import pytest
import torch

from configurator import UserError
from model import (generate, left_pad, load_model, model_config, position_ids_from_mask,
                   sample_next, token_logprobs, backbone, cache_kwargs, output_cache)
from vocab import build_tokenizer

V = 40

def tiny(arch):
    torch.manual_seed(0)
    m = load_model("scratch", V, arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=64, eos_id=1,
                   pad_id=0)
    # a random model with small weights repeats one token; sharpen it so decoding varies
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return m.eval()

def left_padded():
    ids = torch.tensor([[0, 0, 0, 5, 9, 3], [7, 2, 8, 4, 6, 11], [0, 12, 13, 14, 15, 16]])
    lengths = torch.tensor([3, 6, 5])
    mask = (torch.arange(6)[None] >= (6 - lengths)[:, None]).long()
    return ids, mask

def greedy_uncached(m, prompt, n, eos):
    """Batch 1, no cache: re-encode the whole sequence for each new token (the slow reference)."""
    seq, out = prompt[None], []
    for _ in range(n):
        nxt = m(seq).logits[0, -1].argmax()
        out.append(nxt.item())
        if nxt.item() == eos:
            break
        seq = torch.cat([seq, nxt.view(1, 1)], 1)
    return out

def test_left_pad_puts_last_tokens_in_the_last_column():
    ids, mask = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]

def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_cached_greedy_equals_batch1_uncached(arch):
    m = tiny(arch)
    ids, mask = left_padded()
    eos = 1
    toks, stopped = generate(m, ids, mask, 12, stop_sequences=[[eos]], pad_id=0)
    distinct = set()
    for b in range(ids.shape[0]):
        ref = greedy_uncached(m, ids[b][mask[b].bool()], 12, eos)
        got = toks[b].tolist()[:len(ref)]
        assert got == ref
        assert all(t == 0 for t in toks[b].tolist()[len(ref):])  # pad after the stop
        assert bool(stopped[b]) == (ref[-1] == eos)
        distinct |= set(ref)
    assert len(distinct) > 2  # the check is not vacuous: decoding produced varied tokens

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_token_logprobs_match_full_log_softmax(arch):
    m = tiny(arch)
    ids, mask = left_padded()
    pos = position_ids_from_mask(mask)
    hidden = backbone(m)(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    targets = ids.roll(-1, 1)
    want = m(input_ids=ids, attention_mask=mask, position_ids=pos).logits.log_softmax(-1)
    want = want.gather(-1, targets[..., None]).squeeze(-1)
    sel = mask.bool() & (torch.arange(6) < 5)
    got = token_logprobs(m, hidden, targets, sel)
    assert got.dtype == torch.float32
    assert torch.allclose(got[sel], want[sel], atol=1e-5)
    assert (got[~sel] == 0).all()

def test_early_stop_equals_no_early_stop_cut_at_first_stop():
    m = tiny("gpt2")
    ids, mask = left_padded()
    stops = [[3], [5, 7]]  # a single token and a two-token stop sequence
    g = torch.Generator().manual_seed(0)
    early, stopped = generate(m, ids, mask, 20, stop_sequences=stops, pad_id=0, temperature=1.0,
                              generator=g)
    g = torch.Generator().manual_seed(0)
    full, _ = generate(m, ids, mask, 20, stop_sequences=[], pad_id=0, temperature=1.0, generator=g)
    for b in range(ids.shape[0]):
        row = full[b].tolist()
        ends = [i + 1 for i in range(len(row)) if row[i] == 3 or row[max(0, i - 1):i + 1] == [5, 7]]
        cut = ends[0] if ends else len(row)
        assert early[b].tolist()[:cut] == row[:cut]
        assert all(t == 0 for t in early[b].tolist()[cut:])
        assert bool(stopped[b]) == bool(ends)
    assert stopped.any()  # at least one row exercised the early stop

def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 0.7, g).item() for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are never drawn
    assert sample_next(logits, 0.0, 1.0, None).item() == 0

def test_save_pretrained_roundtrip(tmp_path):
    m = tiny("llama")
    m.save_pretrained(tmp_path / "hf")
    m2 = load_model(str(tmp_path / "hf"), V).eval()  # the path users take for a local directory
    ids, mask = left_padded()
    assert torch.equal(m(input_ids=ids, attention_mask=mask).logits,
                       m2(input_ids=ids, attention_mask=mask).logits)
    assert m2.config._attn_implementation == "sdpa"
    m3 = load_model(str(tmp_path / "hf"), V + 3)  # new special tokens get embedding rows
    assert m3.get_input_embeddings().weight.shape[0] == V + 3

def test_unknown_arch_and_file_init_from(tmp_path):
    with pytest.raises(ValueError, match="arch='bert'"):
        load_model("scratch", V, arch="bert")
    f = tmp_path / "ckpt.pt"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_model(str(f), V)

def test_missing_or_bad_gguf_file_is_a_one_line_user_error(tmp_path):
    # the real GGUF model: tests/test_real_model.py; here only what a wrong path gives
    missing, bad = str(tmp_path / "none.gguf"), tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file" * 100)
    for load in (lambda p: load_model(p, V), model_config):
        with pytest.raises(UserError, match="no such .gguf file; give the path of a GGUF") as e:
            load(missing)
        assert "\n" not in str(e.value)
        with pytest.raises(UserError, match="cannot be read as a GGUF model") as e:
            load(str(bad))
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="no such .gguf file"):
        build_tokenizer(missing, [])
    with pytest.raises(UserError, match="cannot be loaded") as e:
        build_tokenizer(str(bad), [])
    assert "\n" not in str(e.value)

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cache_passed_under_the_name_the_installed_transformers_expects(arch, monkeypatch):
    # transformers renamed past_key_values= to cache= (5.24 warns that the old name goes in 5.40;
    # 5.17 only knows past_key_values=). The name we pass must be the one in the forward's
    # signature, and decoding must not log or warn about a deprecated name.
    m = tiny(arch)
    for module in (m, backbone(m)):
        (name,) = cache_kwargs(module, None)
        assert name in inspect.signature(type(module).forward).parameters
    messages = []
    def record(self, msg, *args, **kwargs):
        messages.append(str(msg))
    monkeypatch.setattr(logging.Logger, "warning_once", record)
    monkeypatch.setattr(logging.Logger, "warning", record)
    ids, mask = left_padded()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        toks, _ = generate(m, ids, mask, 4, stop_sequences=[], pad_id=0)
        out = m(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(m, None))
        cache = output_cache(out)
    messages += [str(w.message) for w in caught]
    assert not [msg for msg in messages if "past_key_values" in msg or "deprecat" in msg], messages
    assert toks.shape == (3, 4) and cache.get_seq_length() == ids.shape[1]
