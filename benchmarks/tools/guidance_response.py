#!/usr/bin/env python
"""How much does a guidance-embedding student's output move with guidance_scale, next to the teacher's?

For the same 100 initial noises and digit prompts, the teacher's 50-step DDIM (trailing) sample at
guidance w_a and w_b is compared with the student's 1/2/4-step samples at the same two scales: the RMS
distance between the two latents of each. A student that learned its guidance embedding moves about as
much as the teacher; one that did not gives nearly the same images at every scale. The student's RMS
distance to the teacher's 50-step sample (same noise, same scale) is printed too.

    python benchmarks/tools/guidance_response.py STUDENT_PIPELINE [--teacher assets/digits-sd] [--output F.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("student", help="exported student pipeline folder")
    ap.add_argument("--teacher", default="assets/digits-sd", help="teacher pipeline folder (default: digits-SD)")
    ap.add_argument("--scales", default="1.5,3", help="two guidance scales, comma separated (default: 1.5,3)")
    ap.add_argument("--num-samples", type=int, default=100, help="noises / prompts (default: 100)")
    ap.add_argument("--output", help="also write the result as JSON here")
    args = ap.parse_args()

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.set_grad_enabled(False)
    w_a, w_b = (float(v) for v in args.scales.split(","))
    teacher = StableDiffusionPipeline.from_pretrained(args.teacher, safety_checker=None)
    teacher.scheduler = DDIMScheduler.from_config(teacher.scheduler.config, timestep_spacing="trailing")
    student = StableDiffusionPipeline.from_pretrained(args.student, safety_checker=None)
    for p in (teacher, student):
        p.set_progress_bar_config(disable=True)
    n = args.num_samples
    prompts = [f"a handwritten digit {i % 10}" for i in range(n)]
    shape = (n, teacher.unet.config.in_channels, teacher.unet.config.sample_size, teacher.unet.config.sample_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))

    def run(pipe, steps, w):
        return pipe(prompts, latents=noise.clone(), num_inference_steps=steps, guidance_scale=w, output_type="latent",
                    generator=torch.Generator().manual_seed(1)).images

    def rms(a, b):
        return round(float((a - b).pow(2).mean().sqrt()), 4)

    ref = {w: run(teacher, 50, w) for w in (w_a, w_b)}
    result = {"student_path": args.student, "scales": [w_a, w_b], "num_samples": n,
              "teacher_50_step_moves": rms(ref[w_a], ref[w_b]), "student": {}}
    for steps in (1, 2, 4):
        out = {w: run(student, steps, w) for w in (w_a, w_b)}
        result["student"][f"{steps}_steps"] = {"moves": rms(out[w_a], out[w_b]),
                                               f"to_teacher_at_{w_a}": rms(out[w_a], ref[w_a]),
                                               f"to_teacher_at_{w_b}": rms(out[w_b], ref[w_b])}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
