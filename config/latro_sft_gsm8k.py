# The paper's SFT baseline on GSM8K, as released (scripts/sft_baseline.py): completion-only loss on
# the gold solution, its '####' read as 'The answer is', after the bare question in the chat
# template; AdamW, learning rate decaying linearly to 0, no warm-up, no clipping, bf16. Evaluated
# like the released evaluation of SFT checkpoints (the CoT prompt, greedy, the released checker), so
# the paper's SFT rows (Table 1) can be reproduced:
#   microsoft/Phi-3.5-mini-instruct 75.8 / 77.1, mistralai/Mistral-7B-Instruct-v0.3 57.2 / 59.9,
#   meta-llama/Llama-3.1-8B-Instruct 73.2 / 74.7   (greedy / maj@8)
#     torchrun --standalone --nproc_per_node=8 latro.py config/latro_sft_gsm8k.py
# Hyper-parameters: the values of the one released SFT command (sft_baseline.sh: Mistral-7B on
# ARC-Challenge), applied here to every model and task: 12 epochs, 8 GPUs x 16 per device x 2
# accumulation = 256 sequences per step, lr 1e-7. The paper tuned the learning rate per model and
# selected on test accuracy; no per-model values were released: set --sft_learning_rate per model.
# (The script's own defaults: --sft_epochs=1 --sft_batch_size=128 --sft_learning_rate=5e-7.) The
# released run kept the epoch with the lowest test-split loss and trained on all 7,473 problems
# (348 steps); here the last weights are scored and the last 500 are held out (327 steps).
out_dir = "out/gsm8k_sft"
init_from = "microsoft/Phi-3.5-mini-instruct"
task = "gsm8k"
n_train = 0
n_val = 500               # loaders.py: the last 500 training problems (the hub has no val split)
n_test = 0                # the whole test split
prompt = "sft"            # train on the bare question -> solution + 'The answer is N' + end-of-turn
eval_prompt = "sft_eval"  # the released evaluation of SFT checkpoints uses the CoT prompt on GSM8K
checker = "released"
sft_share = 1.0           # every training question's gold solution
sft_epochs = 12           # ceil(12 x 6,973 / 256) = 327 steps
sft_batch_size = 256
sft_learning_rate = 1e-7
sft_decay = True          # linear decay to 0 (the HF Trainer default the released script ran with)
sft_target_acc = 0.0      # run every step
sft_eval_interval = 27    # about once per epoch (6,973 / 256 = 27.2 steps)
latro_steps = 0           # the SFT baseline alone
batch_size = 24           # (unused at latro_steps=0; kept valid for 8 GPUs)
rloo_k = 16
micro_batch_size = 4      # 32 sequences per GPU per step in 8 micro-batches of 4
gen_batch_size = 48
max_new_tokens = 500
maj_k = 8
gradient_checkpointing = True
