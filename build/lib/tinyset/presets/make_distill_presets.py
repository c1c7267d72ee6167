"""Writes presets/distill/*.json: one file per method x dataset x ipc x preset (paper, cpu).

Run ``python presets/make_distill_presets.py`` after editing the tables below; the JSON files are
what tinyset reads. ``paper`` = the published settings of the reference implementation
(VICO-UoE/DatasetCondensation; ../shared/reference.md 1.1). ``cpu`` = our settings for a 2-core CPU:
the same hyper-parameters with fewer iterations, so that a run ends in minutes to an hour.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent / "distill"
DATASETS = ("mnist", "fashion-mnist", "svhn", "cifar10", "cifar100", "digits", "imagefolder")
IPCS = (1, 10, 50)
LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
REF = "VICO-UoE/DatasetCondensation"

DM_PAPER = {"iterations": 20000, "lr_img": 1.0, "momentum_img": 0.5, "batch_real": 256, "init": "real",
            "model": "convnet", "dsa_strategy": None, "final_eval": "dsa",
            "source": f"{REF} main_DM.py defaults and README (Zhao & Bilen, WACV 2023): lr_img 1, "
                      "batch_real 256, 20000 iterations, init real, DSA color_crop_cutout_flip_scale_rotate "
                      "(no flip for digit datasets, as the DSA README advises)"}
DC_PAPER = {"iterations": 1000, "lr_img": 0.1, "momentum_img": 0.5, "lr_net": 0.01, "batch_real": 256,
            "batch_train": 256, "init": "noise", "model": "convnet", "distance": "layerwise",
            "dsa_strategy": None, "final_eval": "dsa",
            "source": f"{REF} main.py defaults (Zhao et al., ICLR 2021): 1000 iterations, lr_img 0.1, lr_net 0.01, "
                      "batch_real 256, init noise, dis_metric ours, outer/inner loops from get_loops(ipc)"}
DSA_PAPER = {**DC_PAPER, "init": "real",
             "source": f"{REF} README command for DSA (Zhao & Bilen, ICML 2021): main.py with --init real "
                       "--method DSA --dsa_strategy color_crop_cutout_flip_scale_rotate (no flip on MNIST/SVHN)"}

# our CPU budgets: iterations only (every other value as published)
CPU_ITERATIONS = {"dm": 1000, "dc": {1: 100, 10: 10, 50: 3}, "dsa": {1: 100, 10: 10, 50: 3}}


def write(name: str, cfg: dict) -> None:
    (HERE / f"{name}.json").write_text(json.dumps(cfg, indent=2) + "\n")


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for method, paper in (("dm", DM_PAPER), ("dc", DC_PAPER), ("dsa", DSA_PAPER)):
        for ds in DATASETS:
            for ipc in IPCS:
                cfg = dict(paper)
                if method != "dm":
                    cfg["outer_loop"], cfg["inner_loop"] = LOOPS[ipc]
                if ds == "digits":  # 143 or fewer training images per class
                    cfg["batch_real"] = 128
                write(f"{method}_{ds}_ipc{ipc}_paper", cfg)
                cpu = dict(cfg)
                its = CPU_ITERATIONS[method]
                cpu["iterations"] = its if isinstance(its, int) else its[ipc]
                if ds == "digits":  # 8x8 images: the README's one-minute first run
                    cpu["iterations"] = min(cpu["iterations"], 500)
                cpu["final_eval"] = "quick"
                cpu["source"] = (f"tinyset cpu preset: the paper preset ({cfg['source']}) with {cpu['iterations']} "
                                 f"iterations, chosen for a 2-core CPU; see README 'Measured results' for the "
                                 f"accuracy and time it gives where measured")
                write(f"{method}_{ds}_ipc{ipc}_cpu", cpu)
        default = dict(paper)
        if method != "dm":
            default["outer_loop"] = default["inner_loop"] = None  # loops_for(ipc) rule
        write(f"{method}_default_paper", default)
        cpu = dict(default)
        its = CPU_ITERATIONS[method]
        cpu["iterations"] = its if isinstance(its, int) else 20
        cpu["final_eval"] = "quick"
        cpu["source"] = f"tinyset cpu preset for ipc values without their own file: {default['source']}"
        write(f"{method}_default_cpu", cpu)


if __name__ == "__main__":
    main()
