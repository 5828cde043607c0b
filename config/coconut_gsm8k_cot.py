# GSM8k, stage 1 of 2: CoT fine-tuning of GPT-2 (the paper's "CoT" row, and the start of Coconut).
# 4 GPUs as released (any count that divides 128/32 works, the global batch stays 128):
#   torchrun --standalone --nproc_per_node=4 coconut.py config/coconut_gsm8k_cot.py
# Data: the released conversion of GSM8k-Aug (gsm_train.json / gsm_valid.json / gsm_test.json).
# best.pt (by val accuracy, ~40% around epoch 6) is what config/coconut_gsm8k.py starts from.
out_dir = "out/gsm8k_cot"
task = "json"
data_path = "data/gsm_{split}.json"
task_options = "{}"
init_from = "openai-community/gpt2"
method = "cot"
# Coconut's GSM8k curriculum (unused by cot): overlays on this preset (pause: 2 x 3 = 6 pause tokens, as many as
# Coconut's thoughts at inference) get the GSM8k numbers
c_thought = 2
epochs_per_stage = 3
max_latent_stage = 3
num_epochs = 25
batch_size = 128
micro_batch_size = 32
learning_rate = 1e-4
reset_optimizer = "never"        # released gsm_cot: reset_optimizer False, one AdamW throughout
precision = "fp32"               # released: bf16 False
max_new_tokens = 64
