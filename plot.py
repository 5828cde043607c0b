"""
Training curves from the metrics log both scripts write (out_dir/log.jsonl: one JSON object a
line, its step and its metrics), drawn to a PNG:

    python plot.py out/coconut                      # -> out/coconut/curves.png
    python plot.py out/coconut out/cot out/no_cot --out=docs/coconut_curves.png   # overlaid
    python plot.py out/latro

Coconut runs: the training loss per optimizer step and the validation accuracy per epoch, the
stage switches marked. LaTRO runs: the reward, the KL to π0, the share of rationales that stopped
and the validation accuracy per step (the SFT warm-up's validation accuracy before step 0).
matplotlib is an optional dependency (pip install matplotlib; the test extras have it).
"""

import json
import os
import sys

from configurator import UserError, exit_cleanly_on_user_error

def read_log(run_dir):
    """The rows of run_dir/log.jsonl, in order (a run's log: one JSON object a line)."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: give the out_dir of a run of coconut.py or latro.py "
                        f"(they write log.jsonl there)")
    with open(path, encoding="utf-8") as f:
        try:
            rows = [json.loads(line) for line in f if line.strip()]
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not a metrics log (line {e.lineno}: {e.msg})") from None
    if not rows:
        raise UserError(f"{path} holds no metrics yet: the run has not finished a step")
    return rows

def series(rows, key):
    """(steps, values) of the rows that hold `key`."""
    hits = [(r["step"], r[key]) for r in rows if key in r and r["step"] is not None]
    return [s for s, _ in hits], [v for _, v in hits]

def stage_switches(rows):
    """The steps at which a Coconut run's stage changes: (step, new stage)."""
    switches, last = [], None
    for r in rows:
        if "loss" in r and r.get("stage") != last:
            if last is not None:
                switches.append((r["step"] - 1, r["stage"]))
            last = r.get("stage")
    return switches

def draw(run_dirs, out):
    """Draw the runs' curves into `out` (a PNG); returns the path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plot.py needs matplotlib: pip install matplotlib (or pip install -r "
                        "requirements-test.txt)") from None
    logs = {os.path.basename(os.path.normpath(d)) or d: read_log(d) for d in run_dirs}
    if os.path.dirname(out) and not os.path.isdir(os.path.dirname(out)):
        raise UserError(f"--out={out}: no directory {os.path.dirname(out)!r}")
    latro = any("reward" in r for rows in logs.values() for r in rows)
    panels = [("reward", "reward (log π(y|x⊕z) − β·KL)"), ("kl", "KL to π0 (nats)"),
              ("stopped", "share of rationales that stopped"), ("val/acc", "val accuracy")]
    if not latro:
        panels = [("loss", "training loss"), ("val_acc", "val accuracy (greedy)")]
    rows = 1 if len(panels) <= 2 else 2
    fig, axes = plt.subplots(rows, len(panels) // rows, figsize=(10, 3.6 * rows), squeeze=False)
    axes = axes.flatten()
    for ax, (key, title) in zip(axes, panels):
        for name, rows in logs.items():
            steps, values = series(rows, key)
            ax.plot(steps, values, marker="o" if key.startswith("val") else None, ms=3, label=name)
            if key == "val/acc":  # the SFT warm-up's evaluations, before LaTRO's step 0 (x < 0)
                sft_steps, sft_acc = series(rows, "sft_val_acc")
                if sft_steps:
                    ax.plot([s - sft_steps[-1] for s in sft_steps], sft_acc, ls=":",
                            label=f"{name} (SFT warm-up)")
        if not latro:
            for step, stage in stage_switches(next(iter(logs.values()))):
                ax.axvline(step, color="grey", lw=0.8, ls="--")
                ax.text(step, ax.get_ylim()[1], f" stage {stage}", va="top", fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out

def main(argv):
    """python plot.py RUN_DIR [RUN_DIR ...] [--out=PNG]"""
    out = None
    dirs = []
    for arg in argv:
        if arg.startswith("--out="):
            out = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise UserError(f"unknown option {arg!r}: usage: python plot.py RUN_DIR [RUN_DIR ...] "
                            f"[--out=PNG]")
        else:
            dirs.append(arg)
    if not dirs:
        raise UserError("usage: python plot.py RUN_DIR [RUN_DIR ...] [--out=PNG]")
    print(f"wrote {draw(dirs, out or os.path.join(dirs[0], 'curves.png'))}")

if __name__ == "__main__":
    exit_cleanly_on_user_error()
    main(sys.argv[1:])
