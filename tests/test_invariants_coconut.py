"""Coconut invariants that single-line bugs break: the thought probe reads the vectors actually fed
back, the generated-token count includes the eos of rows that stop (and the thoughts), and the
batch check counts the ranks."""
from contextlib import nullcontext

import pytest
import torch

import coconut
from coconut import generate_answers, probe_thoughts
from metrics import Decoding, greedy_accuracy
from inprocess import check_rules_of
from configurator import configure
from model import backbone, lm_head, load_model

V, PAD, EOS, BOT, LAT, EOT = 40, 0, 1, 37, 38, 39


def tiny(emit=None, n_layer=1, sharpen=1.0):
    """A tiny GPT-2. emit=t makes it predict token t at every position (the final norm outputs a
    constant vector along t's tied embedding row): the test decides whether generation meets eos."""
    torch.manual_seed(0)
    m = load_model("scratch", V, arch="gpt2", n_layer=n_layer, n_head=2, n_embd=32, block_size=64,
                   eos_id=EOS, pad_id=PAD)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(sharpen if p.dim() > 1 else 1.0)
        if emit is not None:
            m.transformer.ln_f.weight.zero_()
            m.transformer.ln_f.bias.copy_(100 * m.get_input_embeddings().weight[emit])
    return m.eval()


def test_probe_reads_each_thought_as_the_distribution_after_the_prefix_so_far():
    """Thought j is the last hidden state of the prefix before it (question, <bot>, thoughts
    1..j-1 fed back): its probe row is softmax(head(h)) of a plain forward over that prefix."""
    m = tiny(n_layer=2, sharpen=6.0)
    prompt = [3, 4, 5, BOT, LAT, LAT, LAT, EOT]
    probs, ids = probe_thoughts(m, prompt, LAT, 4, "cpu")
    assert probs.shape == ids.shape == (3, 4)
    with torch.no_grad():
        embeds = m.get_input_embeddings()(torch.tensor([[3, 4, 5, BOT]]))
        for j in range(3):
            h = backbone(m)(inputs_embeds=embeds).last_hidden_state[:, -1:]  # thought j+1's vector
            want_p, want_i = lm_head(m)(h[0, 0]).float().softmax(-1).topk(4)
            assert torch.equal(ids[j], want_i) and torch.allclose(probs[j], want_p, atol=1e-5), j
            embeds = torch.cat([embeds, h], 1)
    assert not torch.equal(ids[0], ids[1]) or not torch.equal(ids[1], ids[2])  # thoughts differ


class IdTokenizer:
    eos_id, pad_id = EOS, PAD

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_generated_token_count_includes_the_eos_of_rows_that_stop_and_the_thoughts():
    """A model that emits eos at once generates 1 token per row (the eos); one that never does
    generates max_new_tokens. greedy_accuracy's count adds each prompt's thoughts (the paper's
    '# tokens') and its text is the row up to its eos."""
    prompts = [[3, 4, BOT, LAT, LAT, EOT], [5, 6, 7, 8, BOT, LAT, LAT, EOT]]
    tokens, n_gen = generate_answers(tiny(emit=EOS), prompts, LAT, EOS, PAD, 6, "cpu")
    assert tokens[:, 0].tolist() == [EOS, EOS] and n_gen.tolist() == [1, 1]
    tokens, n_gen = generate_answers(tiny(emit=9), prompts, LAT, EOS, PAD, 6, "cpu")
    assert tokens.tolist() == [[9] * 6] * 2 and n_gen.tolist() == [6, 6]
    # (accuracy, mean tokens, texts) over the 2 prompts: x 2 gives the counts
    acc, n_tok, texts = greedy_accuracy(tiny(emit=EOS), None, prompts, ["a", "b"],
                                        Decoding(IdTokenizer(), LAT, 1, 6, nullcontext(), "cpu",
                                                 generate=generate_answers))
    assert (acc * 2, n_tok * 2, texts) == (0, 2 * (1 + 2), [str(EOS)] * 2)
    acc, n_tok, texts = greedy_accuracy(tiny(emit=9), None, prompts, ["9", "b"],
                                        Decoding(IdTokenizer(), LAT, 2, 5, nullcontext(), "cpu",
                                                 generate=generate_answers))
    assert (acc * 2, n_tok * 2, texts) == (0, 2 * (5 + 2), ["9 9 9 9 9"] * 2)


def test_batch_check_counts_every_rank():
    """batch_size is global: accumulation = batch_size / (micro_batch_size x ranks), and a batch
    that does not split over the ranks is refused naming the rank count."""
    cfg = configure(dict(vars(coconut)), [], verbose=False)
    cfg.update(batch_size=16, micro_batch_size=4)
    for w in (1, 2, 4):                                                # 4, 2, 1 micro-steps
        check_rules_of(coconut, cfg, w)
    cfg.update(batch_size=8)
    with pytest.raises(ValueError, match="micro_batch_size=4 x 4 ranks = 16"):
        check_rules_of(coconut, cfg, 4)
