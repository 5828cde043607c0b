"""The checks that need a CUDA GPU: bf16 autocast training steps, the cached latent forward under
SDPA and eager attention kernels, KV-cached decoding against batch 1 and the CPU, NCCL DDP and FSDP2
runs of both scripts that resume, and the memory plan against the allocator's peak. Tiny random
models, nothing downloaded, nothing needed beyond torch, transformers and pytest. Without CUDA
every test here is skipped with its reason; `python -m pytest` runs them where CUDA is present.

    python -m pytest tests/test_gpu.py && python bench.py --preset=gpu     # on one GPU

The device is the module global DEVICE. To check these tests' own logic without a GPU, a developer
runs them on the CPU (gloo instead of NCCL; the comparison with CUDA's memory counters is skipped):

    NANOLATENT_GPU_TESTS_ON_CPU=1 python -m pytest tests/test_gpu.py
"""
import copy
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from coconut import Coconut, collate, generate_answers, latent_forward, naive_latent_forward
from latro import (SequenceScorer, build_batch, latro_backward, latro_loss, latro_rewards,
                   rloo_advantages, score_rows)
from model import (Sampler, autocast_ctx, generate, left_pad, lm_head, load_model,
                   n_params_of_config, sample, scratch_config)
from preflight import estimate_activation_bytes, estimate_kv_cache_bytes, memory_plan
from test_coconut_script import TINY as COCONUT_TINY
from test_latro_script import DIST as LATRO_TINY

ON_CPU = os.environ.get("NANOLATENT_GPU_TESTS_ON_CPU") == "1"  # a developer's check, see above
DEVICE = "cpu" if ON_CPU else "cuda"
DEVICE_TYPE = DEVICE.split(":")[0]
pytestmark = pytest.mark.skipif(
    not ON_CPU and not torch.cuda.is_available(),
    reason="needs a CUDA GPU: bf16 autocast, CUDA attention kernels, NCCL, FSDP2 and the memory "
           "plan on CUDA (run `python -m pytest tests/test_gpu.py` on a GPU machine)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, PAD, EOS, BOT, LAT, EOT = 40, 0, 1, 37, 38, 39
# cached vs naive latent forward, max |difference| of the last hidden states (after the final
# norm, values up to ~3). fp32: the same sums in another order (CPU: 5e-7). bf16: each pass rounds
# its own activations (CPU: bf16 against fp32 differs by ~1e-2). Feeding a thought back wrongly
# (or not at all) moves them by ~3.
FP32_TOL = 1e-4
BF16_TOL = 0.1
# the memory plan against torch.cuda.max_memory_allocated, both ways (as test_fsdp.py does for
# the peak RSS on the CPU). Expected near the top: the tensors autograd saves for the step below,
# counted on the CPU in bf16, are ~340 MiB against the plan's 182 MiB of activations (HF GPT-2
# keeps an fp32 residual stream and the intermediates of its tanh GELU), so the peak should come
# to about 1.5x the plan's 340 MiB total
MEMORY_FACTOR = 2.0


def tiny(arch="gpt2", attn="sdpa", sharpen=1.0):
    """A 2-layer random model on DEVICE, fp32 weights."""
    torch.manual_seed(0)
    m = load_model("scratch", V, attn_implementation=attn, device_type=DEVICE_TYPE, arch=arch,
                   n_layer=2, n_head=2, n_embd=32, block_size=64, eos_id=EOS, pad_id=PAD)
    # a random tiny model repeats one token; larger weights make greedy decoding vary
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(sharpen)
    return m.to(DEVICE).eval()


def ragged_batch():
    """Left-padded rows of different lengths and 0..3 thoughts, first thoughts column-aligned
    (coconut.collate), on DEVICE."""
    rows = [([3, 4, 5, BOT, LAT, LAT, EOT], [6, 7, EOS]),
            ([3, 4, 5, 6, 7, 8, 9, BOT, LAT, EOT], [6, EOS]),
            ([5, BOT, LAT, LAT, LAT, EOT], [9, 9, 9, EOS]), ([5, 6, BOT, EOT], [9, EOS])]
    return tuple(t.to(DEVICE) for t in collate(rows, LAT, PAD))


def head_dtypes(model):
    """A list that collects the LM head's output dtype at every call."""
    seen = []
    lm_head(model).register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    return seen


# ---- bf16 autocast training steps --------------------------------------------------------------

def test_bf16_coconut_step_is_finite_and_lowers_the_loss():
    # coconut.py's step under precision=bf16: autocast matmuls, fp32 weights and loss, AdamW
    m = tiny().train()
    ids, mask, labels = ragged_batch()
    step = Coconut(m, LAT)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    dtypes = head_dtypes(m)
    losses = []
    for _ in range(6):
        with autocast_ctx(DEVICE_TYPE, "bf16"):
            loss = step(ids, mask, labels)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert loss.dtype == torch.float32 and set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in m.parameters())
    assert all(math.isfinite(x) for x in losses)
    # the same fixed batch six times: lr 1e-2 on a random model takes the loss well down
    assert losses[-1] < losses[0] - 0.1, losses


def test_bf16_latro_step_is_finite_and_lowers_the_loss():
    # latro.py's step on the GPU: bf16 rollouts (sample), one-pass scoring of policy and frozen
    # reference, rewards, RLOO advantages, latro_backward; the rollouts and their advantages are
    # then kept fixed, so latro_loss is one function of the weights that the updates must lower
    policy, ref = tiny().train(), tiny()
    ctx = autocast_ctx(DEVICE_TYPE, "bf16")
    K, prompts = 4, [[3, 4, 5], [6, 7, 8, 9, 10]]
    xs = [p for p in prompts for _ in range(K)]
    ys = [[20, 21, EOS]] * len(xs)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    zs, stopped, _ = sample(policy, xs, 8, Sampler(None, {EOS}, [], PAD, len(xs), ctx), g,
                            temperature=1.0)
    assert len({tuple(z) for z in zs}) > 1                               # the rollouts vary
    scorer, ref_scorer = SequenceScorer(policy), SequenceScorer(ref)
    logp_z, logp_y = score_rows(scorer, xs, zs, ys, PAD, len(xs), ctx)
    ref_z, _ = score_rows(ref_scorer, xs, zs, ys, PAD, len(xs), ctx)
    # the same weights scored in the same shapes: the KL is 0 at step 0 (up to kernel round-off)
    assert (logp_z - ref_z).abs().max().item() <= 1e-5
    rewards, _ = latro_rewards(logp_y, logp_z, ref_z, stopped.to(DEVICE), K, 0.05, 2.0, "group")
    adv = rloo_advantages(rewards, K)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    dtypes = head_dtypes(policy)
    losses = []
    for _ in range(6):
        # sft_coef=1 (the paper's Eq. 4): both terms of the gradient, two micro-batches
        losses.append(latro_backward(scorer, (xs, zs, ys), adv, 1.0, 4, PAD, ctx, DEVICE))
        assert all(torch.isfinite(p.grad).all() for p in policy.parameters()
                   if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert set(dtypes) == {torch.bfloat16}
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1, losses
    # the self-reward log π(y|x⊕z) rose, and the loss latro_backward reports is latro_loss's
    with torch.no_grad(), ctx:
        lz, ly = scorer(*build_batch(xs, zs, ys, PAD, DEVICE))
        after = latro_loss(lz, ly, adv, 1.0).item()
    assert ly.mean().item() > logp_y.mean().item()
    assert after < losses[0]


# ---- the cached latent forward on CUDA kernels -----------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_latent_forward_equals_naive_rerun(attn, arch):
    # each cached pass sees what the naive re-run sees (the earlier positions through the cache,
    # the same thought vectors, positions and masks), on the device's own attention kernels
    m = tiny(arch, attn)
    assert m.config._attn_implementation == attn
    ids, mask, _ = ragged_batch()
    real = mask.bool()
    assert not real[:, 0].all()                                         # left padding
    with torch.no_grad():
        got, _ = latent_forward(m, ids, mask, LAT)
        ref, _ = naive_latent_forward(m, ids, mask, LAT)
        plain, _ = latent_forward(m, ids, mask, None)                   # no thought fed back
        with autocast_ctx(DEVICE_TYPE, "bf16"):
            got16, _ = latent_forward(m, ids, mask, LAT)
            ref16, _ = naive_latent_forward(m, ids, mask, LAT)
    assert (got - ref)[real].abs().max().item() <= FP32_TOL
    assert (got16.float() - ref16.float())[real].abs().max().item() <= BF16_TOL
    # the tolerances are far below what a missing feedback changes
    assert (plain - ref)[real].abs().max().item() > 10 * BF16_TOL


# ---- KV-cached decoding ------------------------------------------------------------------------

def greedy(model, prompts, device):
    """model.generate's greedy tokens for left-padded prompts, as lists."""
    ids, mask = left_pad(prompts, PAD, device)
    tokens, _ = generate(model, ids, mask, 12, stop_sequences=[[EOS]], pad_id=PAD)
    return tokens.tolist()


def assert_batched_equals_batch1(batched, ones):
    # a batch-1 row ends at its eos; the batched row pads after it until every row is done
    for row, one in zip(batched, ones):
        assert row[:len(one)] == one and set(row[len(one):]) <= {PAD}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_cached_decoding_equals_batch1_and_the_cpu(arch):
    m = tiny(arch, sharpen=8.0)
    cpu = copy.deepcopy(m).cpu()
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16, 17], [18]]
    with torch.no_grad():
        batched = greedy(m, prompts, DEVICE)
        assert_batched_equals_batch1(batched, [greedy(m, [p], DEVICE)[0] for p in prompts])
        assert batched == greedy(cpu, prompts, "cpu")                   # fp32: the same tokens
        # Coconut's latent generation: thoughts through the cache, then the same decoding
        latent = [[3, 4, 5, BOT, LAT, LAT, EOT], [7, 8, 9, 10, 11, 12, BOT, LAT, LAT, EOT],
                  [13, BOT, LAT, LAT, EOT]]
        tokens, n_gen = generate_answers(m, latent, LAT, EOS, PAD, 10, DEVICE)
        answers = [row[:n] for row, n in zip(tokens.tolist(), n_gen.tolist())]
        for p, answer in zip(latent, answers):
            one, n = generate_answers(m, [p], LAT, EOS, PAD, 10, DEVICE)
            assert one[0, :n[0]].tolist() == answer
        on_cpu, n_cpu = generate_answers(cpu, latent, LAT, EOS, PAD, 10, "cpu")
        assert [row[:n] for row, n in zip(on_cpu.tolist(), n_cpu.tolist())] == answers
    # not a vacuous comparison: the decoded tokens vary
    assert len({t for row in batched for t in row}) > 2
    assert len({t for row in answers for t in row}) > 2


# ---- the scripts under torchrun: NCCL DDP and FSDP2, saved and resumed ------------------------

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(script, args):
    """One process under torchrun (NCCL on CUDA, gloo on the CPU); its stdout. The device goes
    last, so it overrides the CPU tests' --device=cpu."""
    p = subprocess.run([*TORCHRUN, script, *args, f"--device={DEVICE}"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)  # a hang fails here
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


def logged_steps(stdout):
    return [int(m) for m in re.findall(r"^step (\d+)/", stdout, re.M)]


def assert_on_device(stdout, mode):
    # the memory plan names the mode; on CUDA it checks the GPU's memory, on the CPU the host's
    assert f"{mode} on 1 {'GPU' if DEVICE_TYPE == 'cuda' else 'CPU process'}," in stdout
    assert ("(the host's memory per process)" in stdout) == (DEVICE_TYPE == "cpu")


def test_coconut_ddp_and_fsdp_runs_save_checkpoints_that_resume(tmp_path):
    # epoch 0 (stage 0) under DDP, epoch 1 (one thought) under FSDP2 resumed from DDP's checkpoint,
    # epoch 2 (all latent) under DDP resumed from FSDP2's: 2 optimizer steps per epoch
    out = [f"--out_dir={tmp_path}", "--epochs_per_stage=1", "--precision=bf16"]
    runs = [(["--num_epochs=1"], "ddp", [1, 2]),
            (["--num_epochs=2", "--init_from=resume", "--fsdp=True"], "fsdp", [3, 4]),
            (["--num_epochs=3", "--init_from=resume"], "ddp", [5, 6])]
    for args, mode, steps in runs:
        stdout = torchrun("coconut.py", COCONUT_TINY + out + args)
        assert_on_device(stdout, mode)
        assert logged_steps(stdout) == steps, stdout[-2000:]
        assert "test acc" in stdout
        ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        assert ckpt["iter_num"] == steps[-1]
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert f"resumed from {tmp_path / 'ckpt.pt'}: epoch 2" in stdout


def test_latro_ddp_and_fsdp_runs_save_checkpoints_that_resume(tmp_path):
    # steps 1-2 under DDP, step 3 under FSDP2 resumed from DDP's checkpoint, step 4 under DDP
    # resumed from FSDP2's
    out = [f"--out_dir={tmp_path}"]
    runs = [(["--stop_at_step=2"], "ddp", [1, 2]),
            (["--init_from=resume", "--stop_at_step=3", "--fsdp=True"], "fsdp", [3]),
            (["--init_from=resume"], "ddp", [4])]
    for args, mode, steps in runs:
        stdout = torchrun("latro.py", LATRO_TINY + out + args)
        assert_on_device(stdout, mode)
        assert f"on {DEVICE_TYPE}" in stdout                             # the model's line
        assert logged_steps(stdout) == steps, stdout[-2000:]
        ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        assert ckpt["iter_num"] == steps[-1]
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert "after LaTRO" in stdout


# ---- the memory plan against the allocator -----------------------------------------------------

def test_memory_plan_is_within_a_factor_of_the_measured_peak():
    # preflight.py's plan of a Coconut step (bf16 autocast, 4 thoughts, AdamW) and an evaluation
    # generate call, made from the config before any weight exists as coconut.py makes it, against
    # CUDA's peak allocation over two steps and the call
    B, T, n_thoughts, labelled, vocab, rows, new = 8, 256, 4, 128, 8192, 8, 32
    shape = dict(n_layer=4, n_head=6, n_embd=384, block_size=T + new, eos_id=1, pad_id=0)
    cfg = scratch_config(vocab, **shape)
    acts = estimate_activation_bytes(cfg, B * T, logit_positions=B * labelled)
    kv = estimate_kv_cache_bytes(cfg, rows, T + new)
    plan = memory_plan(n_params_of_config(cfg), mode="ddp", world_size=1, precision="bf16",
                       kv_cache_bytes=kv, activations_bytes=acts)
    # not a comparison of weights alone: the activations are a good part of the plan
    assert plan["activations"] > plan["total"] / 4
    if DEVICE_TYPE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    m = load_model("scratch", vocab, attn_implementation="sdpa", device_type=DEVICE_TYPE, **shape)
    m.to(DEVICE).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab - 1, (B, T), generator=g)
    prefix = T - labelled - n_thoughts
    ids[:, prefix:prefix + n_thoughts] = vocab - 1                     # the thought columns
    labels = torch.full_like(ids, -100)
    labels[:, T - labelled:] = ids[:, T - labelled:]
    ids, labels = ids.to(DEVICE), labels.to(DEVICE)
    step = Coconut(m, vocab - 1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    for _ in range(2):                                                 # the second has Adam's state
        with autocast_ctx(DEVICE_TYPE, "bf16"):
            loss = step(ids, torch.ones_like(ids), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    m.eval()
    prompts = ids[:rows, :prefix + n_thoughts].tolist()
    with autocast_ctx(DEVICE_TYPE, "bf16"):
        tokens, _ = generate_answers(m, prompts, vocab - 1, 1, 0, new, DEVICE)
    assert math.isfinite(loss.item()) and tokens.shape[0] == rows
    if DEVICE_TYPE != "cuda":
        pytest.skip("the step and the plan ran; CUDA's memory counters are needed to compare them")
    measured = torch.cuda.max_memory_allocated() - base
    summary = {"planned_MiB": plan["total"] / 2**20, "measured_MiB": measured / 2**20}
    assert plan["total"] / MEMORY_FACTOR <= measured <= MEMORY_FACTOR * plan["total"], summary
