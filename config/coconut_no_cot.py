# Overlay: the "no_cot" method on top of a task preset (see the table in coconut.py's docstring),
# e.g.
#   torchrun --standalone --nproc_per_node=4 coconut.py config/coconut_prosqa.py \
#       config/coconut_no_cot.py --out_dir=out/prosqa_no_cot
#   python coconut.py --method=no_cot                                        (the CPU demo)
method = "no_cot"
