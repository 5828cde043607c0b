"""parallel.py's FSDP2 section: sharded training equals DDP, gathered checkpoints resume either
way, gathered generation equals the unsharded model's, activation checkpointing, and preflight.py's
memory plan (arithmetic, refusal, measured peak).

The distributed checks share one 2-process gloo launch of tests/fsdp_driver.py (a launch costs more
than the work)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from configurator import ConfigError
from model import load_model, n_params_of_config, prefill
from parallel import enable_activation_checkpointing
from preflight import GiB, check_memory_plan, estimate_kv_cache_bytes, memory_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# DDP all-reduces and FSDP reduce-scatters the same two gradients: here the sums agree to the last
# bit, but another summation order may differ by fp32 round-off (a few ulps of weights of size ~1,
# over 4 AdamW steps)
FP32_TOL = 1e-5

@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    # glibc's malloc keeps freed blocks in per-thread arenas (gloo's threads make many), so the peak
    # RSS grows with every step; serving blocks >= 64 KiB by mmap returns them on free and the peak
    # RSS tracks live tensors
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "fsdp_driver.py"), str(out)]
    # a timeout, not a hang: a collective one rank skips blocks the other forever
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(out / "results.json") as f:
        return dict(json.load(f), out_dir=str(out))

def test_fsdp_training_equals_ddp(results):
    # same init, same per-rank micro-batches, gradient accumulation over 2 micro-steps (sync on the
    # last only)
    r = results
    assert r["fsdp_losses"] == pytest.approx(r["ddp_losses"], abs=FP32_TOL)
    assert r["fsdp_vs_ddp"] <= FP32_TOL
    # the gathered state dict has the unsharded model's keys (tied ones included)
    assert r["keys_equal"]
    assert len(set(r["ddp_losses"])) == len(r["ddp_losses"])  # the weights did move between steps

def test_resume_equals_uninterrupted_run_across_fsdp_and_ddp_checkpoints(results):
    r = results
    assert r["resume_losses"] == pytest.approx(r["fsdp_losses"][2:], abs=FP32_TOL)
    assert r["resume_vs_fsdp"] <= FP32_TOL
    # a DDP checkpoint (the same plain full tensors) resumes under FSDP too
    assert r["cross_losses"] == pytest.approx(r["fsdp_losses"][2:], abs=FP32_TOL)
    assert r["cross_vs_fsdp"] <= FP32_TOL
    # and an FSDP checkpoint resumes under DDP
    assert r["ddp_from_fsdp_losses"] == pytest.approx(r["ddp_losses"][2:], abs=FP32_TOL)
    assert r["ddp_from_fsdp_vs_ddp"] <= FP32_TOL

def test_save_pretrained_export_from_fsdp_loads_with_transformers(results):
    # written by rank 0 from the gathered weights of the FSDP run's halfway checkpoint
    out = results["out_dir"]
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "fsdp_hf"))
    assert model.config.architectures == ["GPT2LMHeadModel"]  # not the FSDP subclass
    want = torch.load(os.path.join(out, "fsdp.pt"), weights_only=True)["model"]
    got = model.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # still tied
    assert got["lm_head.weight"].data_ptr() == got["transformer.wte.weight"].data_ptr()

def test_activation_checkpointing_under_fsdp_changes_nothing(results):
    r = results
    # the layers are in training mode with checkpointing on: the recompute did run
    assert r["gc_active"]
    assert r["gc_losses"] == pytest.approx(r["fsdp_losses"], abs=FP32_TOL)
    assert r["gc_vs_fsdp"] <= FP32_TOL

def test_multi_pass_cached_forward_under_fsdp_equals_ddp(results):
    # a Coconut-like forward: three passes per step through every layer, the KV cache carried across
    # them
    r = results
    assert r["fsdp_multipass_losses"] == pytest.approx(r["ddp_multipass_losses"], abs=FP32_TOL)
    assert r["multipass_fsdp_vs_ddp"] <= FP32_TOL

def test_gathered_generation_equals_unsharded_and_gathers_once(results):
    g = results["generate"]
    assert g["equal"]
    # not vacuous: decoding produced varied tokens
    assert len({t for row in g["tokens"] for t in row}) > 2
    # a prefill and several decoding forwards; per-layer gathering would cost 3 all-gathers per
    # forward, gathered() gathers each of the 3 units once for the whole call
    assert g["all_gathers"] == g["n_units"]

def test_frozen_reference_sharded_scores_as_unsharded(results):
    # LaTRO's reference model: no gradients, sharded on its own, gathered per layer under no_grad
    assert results["reference_diff"] <= 1e-6

def test_bf16_policy_computes_in_bf16_and_keeps_fp32_masters_and_gradients(results):
    b = results["bf16"]
    assert b["dtypes"]["False"] == ["torch.float32"] * 3
    # master weight and its gradient (reduced in fp32) stay fp32; the gathered copy is bf16
    assert b["dtypes"]["True"] == ["torch.float32", "torch.float32", "torch.bfloat16"]
    # bf16 has 8 bits of mantissa: a loss near 4 agrees to about 1e-2, and does differ
    assert b["bf16_loss"] == pytest.approx(b["fp32_loss"], abs=5e-2)
    assert b["bf16_loss"] != b["fp32_loss"]

def test_memory_plan_within_2x_of_measured_peak(results):
    # 8-layer Llama, 8.5M parameters, FSDP on 2 ranks, one AdamW step then a gathered generation;
    # measured as the growth of the process's peak RSS (after a warm-up run that pays the one-off
    # costs)
    m = results["memory"]
    assert m["planned"] / 2 <= m["measured"] <= 2 * m["planned"], m

# ---- single process

def test_memory_plan_arithmetic():
    n = 1_000_000_000
    ddp = memory_plan(n, mode="ddp", world_size=8, precision="bf16", reference="full")
    # fp32 weights 4 + gradients 4 + DDP buckets 4 + AdamW 8 + fp32 reference 4 = 24 bytes per
    # parameter
    assert ddp["bytes_per_param"] == 24 and ddp["total"] == 24 * n and ddp["gathered"] == 0
    fsdp = memory_plan(n, mode="fsdp", world_size=8, precision="bf16", reference="sharded",
                       grad_accum=1, kv_cache_bytes=3 * GiB, activations_bytes=GiB)
    assert fsdp["bytes_per_param"] == 20 / 8  # everything sharded 8 ways
    # + the bf16 gathered weights and the KV cache (larger than the activations)
    assert fsdp["total"] == int(20 / 8 * n) + 2 * n + 3 * GiB
    accum = memory_plan(n, mode="fsdp", world_size=8, precision="bf16", grad_accum=12)
    assert accum["grads"] == 4 * n // 8 + 4 * n  # non-syncing micro-steps hold full fp32 gradients
    single = memory_plan(n, mode="ddp", world_size=1, precision="fp32")
    assert single["bytes_per_param"] == 16  # no buckets without a second rank
    with pytest.raises(ValueError, match="sharded"):
        memory_plan(n, mode="ddp", world_size=8, precision="bf16", reference="sharded")

def test_memory_plan_refuses_what_cannot_fit_and_names_the_fixes():
    plan = memory_plan(8_030_261_248, mode="ddp", world_size=8, precision="bf16", reference="full",
                       device_bytes=80 * 10 ** 9)
    with pytest.raises(ConfigError) as e:
        check_memory_plan(plan)
    msg = str(e.value)
    fixes = ("exceeds", "--fsdp=True", "more GPUs", "--gradient_checkpointing=True", "micro-batch")
    for fix in fixes:
        assert fix in msg
    # the device's 80e9 bytes and the plan's parts are shown
    assert "74.5 GiB" in msg and "weights" in msg
    fits = memory_plan(8_030_261_248, mode="fsdp", world_size=8, precision="bf16",
                       reference="sharded", device_bytes=80 * 10 ** 9)
    check_memory_plan(fits)  # no error: 20/8 bytes per parameter + 16 GB of gathered bf16 weights

def test_kv_cache_estimate_equals_a_real_cache():
    # grouped-query attention (2 kv heads for 4 query heads) and an explicit head_dim: both must
    # enter the count
    cfg = AutoConfig.for_model("llama", vocab_size=50, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 50, (5, 7))
    _, cache = prefill(model, ids, torch.ones_like(ids))
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    real = sum(t.numel() * t.element_size() for t in tensors)
    assert estimate_kv_cache_bytes(cfg, rows=5, tokens=7, dtype_bytes=4) == real
    assert n_params_of_config(cfg) == sum(p.numel() for p in model.parameters())

def test_checkpointing_drops_the_cache():
    # why Coconut's cached multi-pass forward cannot use enable_activation_checkpointing:
    # transformers turns the cache off in a checkpointed layer, so a later pass no longer attends to
    # the earlier ones and the loss changes
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from fsdp_driver import Step
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = {}
    for passes in (1, 3):
        for ckpt in (False, True):
            torch.manual_seed(0)
            model = load_model("scratch", 64, arch="llama", n_layer=2, n_head=2, n_embd=32,
                               block_size=64)
            if ckpt:
                enable_activation_checkpointing(model)
            losses[passes, ckpt] = Step(model, passes)(ids).item()
    # one pass: checkpointing is exact
    assert losses[1, True] == pytest.approx(losses[1, False], abs=1e-6)
    assert abs(losses[3, True] - losses[3, False]) > 1e-3  # cached passes: the result changes

def test_bench_model_shapes_give_the_published_parameter_counts():
    # bench.py's memory table rests on these counts: by hand from the shapes, from a meta-device
    # build, and the model cards' rounded sizes must all agree
    import bench
    for name, shapes in bench.MODEL_CONFIGS.items():
        n = bench.count_params(shapes)
        assert n == n_params_of_config(bench.config_of(name)), name
        size = f"{n / 1e6:.0f}M" if n < 1e9 else f"{n / 1e9:.2f}B"
        assert size == bench.PUBLISHED_SIZES[name], name
    assert bench.count_params(bench.MODEL_CONFIGS["Llama-3.1-8B"]) == 8_030_261_248
    assert bench.count_params(bench.MODEL_CONFIGS["gpt2"]) == 124_439_808
