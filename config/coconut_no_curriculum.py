# Overlay: Coconut "w/o curriculum": every epoch at the final stage (all steps replaced by
# thoughts), e.g.
#   torchrun --standalone --nproc_per_node=4 coconut.py config/coconut_prosqa.py \
#       config/coconut_no_curriculum.py --out_dir=out/prosqa_no_curriculum
start_stage = 99  # capped at max_latent_stage + 1
