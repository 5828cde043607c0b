# GSM8k, stage 1 of 2: CoT fine-tuning of GPT-2 (the paper's "CoT" row, and the start of Coconut).
# 4 GPUs as released (any count that divides 128/32 works, the global batch stays 128):
#   torchrun --standalone --nproc_per_node=4 coconut.py config/coconut_gsm8k_cot.py
# Data: the released conversion of iCoT's GSM8k-Aug text files (data/gsm8k/{train,valid,test}.txt of
# da03/Internalize_CoT_Step_by_Step), one split per call:
#   python data.py prepare gsm8k_aug train.txt data/gsm_train.json   (valid.txt, test.txt alike)
# Every epoch's weights are kept: epoch_N.pt = after N epochs (log epochs 0..N-1), as the released
# checkpoint_N. config/coconut_gsm8k.py starts from epoch_6.pt (paper: 6 epochs of stage 0; no
# schedule, so the weights a 6-epoch run ends with); best.pt is the best val epoch of the 25.
out_dir = "out/gsm8k_cot"
keep_epoch_checkpoints = True    # epoch_N.pt each epoch (GPT-2: 0.5 GB each, 12 GB for 25 epochs)
task = "json"
data_path = "data/gsm_{split}.json"
task_options = "{}"
init_from = "openai-community/gpt2"
method = "cot"
# Coconut's GSM8k curriculum (unused by cot): overlays on this preset (pause: 2 x 3 = 6 pause
# tokens, as many as
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
probe = 2
