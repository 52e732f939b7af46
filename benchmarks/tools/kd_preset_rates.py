"""Step cost of presets relative to the first one (lcm.yaml, whose rate alone on 2 cores is known), one thread.

    PYTHONPATH=. python benchmarks/tools/kd_preset_rates.py train_scripts/digits/lcm.yaml train_scripts/digits/kd_*.yaml

One optimiser step of each preset's method on one real batch, interleaved over 5 rounds, the fastest of each kept:
on a machine shared with other jobs the ratios hold better than the absolute times. Presets with --student-from
need that pipeline on disk (a 2-step run of the preset before it is enough).
"""
import sys
import time

import torch

from diffdistill.config import build_run_config, load_yaml
from diffdistill.data import build_dataset
from diffdistill.methods import build_method_config, get_method
from diffdistill.teachers import load_teacher

torch.set_num_threads(1)
teacher = load_teacher("assets/digits-sd")
ds = build_dataset(build_run_config({}, {}).data, 32)
setups = {}
for preset in sys.argv[1:]:
    run = build_run_config(load_yaml(preset), {"output": "x"})
    m = get_method(run.method).method_cls(build_method_config(run.method, run.method_args, "x"), run)
    m.setup(teacher)
    opt = torch.optim.AdamW([p for p in m.parameters("student")], lr=1e-5)
    bs = run.train.batch_size
    batch = {"pixel_values": torch.stack([ds[i]["pixel_values"] for i in range(bs)]), "prompt": [ds[i]["prompt"] for i in range(bs)]}
    setups[preset] = (m, opt, batch)
best = {p: 1e9 for p in setups}
for r in range(5):
    for p, (m, opt, batch) in setups.items():
        t0 = time.time()
        for ph in m.phases:
            loss, _ = m.loss(ph, batch, r)
            loss.backward()
            opt.step()
            opt.zero_grad()
        m.after_step(r)
        best[p] = min(best[p], time.time() - t0)
ref = best[sys.argv[1]]
for p, t in best.items():
    print(f"{p}: {t:.3f} s/step min, {t / ref:.2f} x lcm.yaml's step", flush=True)
