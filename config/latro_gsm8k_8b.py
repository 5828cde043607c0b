# LaTRO on GSM8K with a 7-8B model (the paper's Llama-3.1-8B and Mistral-7B rows):
# config/latro_gsm8k.py's recipe with FSDP2 sharding, which these models need on 80 GB GPUs (plain
# DDP would hold ~24 bytes/parameter per GPU):
#     torchrun --standalone --nproc_per_node=8 latro.py config/latro_gsm8k_8b.py
#     torchrun --standalone --nproc_per_node=8 latro.py config/latro_gsm8k_8b.py \
#         --init_from=mistralai/Mistral-7B-Instruct-v0.3 --out_dir=out/gsm8k_latro_mistral
# The start-up memory plan prints the per-GPU estimate (weights, gradients, AdamW state and the
# frozen reference sharded over the 8 GPUs, plus the rollouts' KV cache) and stops before loading
# if it does not fit.
out_dir = "out/gsm8k_latro_llama31"
init_from = "meta-llama/Llama-3.1-8B-Instruct"
fsdp = True               # shard the policy and the frozen reference over the GPUs
task = "gsm8k"
checker = "released"
n_train = 0
n_test = 0
sft_steps = 0
latro_steps = 117
beta = 0.05
n_val = 500
batch_size = 24
rloo_k = 16
micro_batch_size = 4
gen_batch_size = 48
max_rationale_tokens = 500
max_new_tokens = 500
temperature = 1.0
top_p = 1.0
gamma = 2.0
penalty = "group"
sft_coef = 0.0
learning_rate = 5e-7
weight_decay = 0.0
eval_interval = 20
maj_k = 8
gradient_checkpointing = True
