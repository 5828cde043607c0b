# Overlay: the "cot" method on top of a task preset (see the table in coconut.py's docstring), e.g.
#   torchrun --standalone --nproc_per_node=4 coconut.py config/coconut_prosqa.py \
#       config/coconut_cot.py --out_dir=out/prosqa_cot
#   python coconut.py --method=cot                                        (the CPU demo)
method = "cot"
