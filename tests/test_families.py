"""Teacher families beyond SD 1/2 end to end on tiny random models: every method on an SD3 (MMDiT, flow
matching with shift) teacher trains a few steps through the CLI, exports, and the export samples in a fresh
process that loads it with plain ``DiffusionPipeline.from_pretrained``; the LoRA loads with
``load_lora_weights``; bad teachers are one-line errors with exit status 2 and nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffdistill.cli import main

BASE = ["--max-train-steps", "2", "--batch-size", "2", "--checkpointing-steps", "0", "--validation-steps", "0",
        "--benchmark-samples", "0", "--lr-warmup-steps", "0", "--learning-rate", "1e-3"]
# SD3: one teacher guidance scale (the MMDiT has no guidance embedding: the student bakes it in). SDXL's UNet
# takes a guidance embedding, so its LCM trains on a range of scales as LCM-SDXL does.
METHODS = {
    "lcm": ["--method", "lcm", "--steps", "2", "--num-ddim-timesteps", "10", "--w-min", "2", "--w-max", "2"],
    "lcm_lora": ["--method", "lcm", "--steps", "2", "--num-ddim-timesteps", "10", "--w-min", "2", "--w-max", "2",
                 "--lora-rank", "4", "--ema-decay", "0"],
    "progressive": ["--method", "progressive", "--steps", "2", "--start-steps", "4", "--iters-per-stage", "1",
                    "--guidance-iters", "1", "--w-min", "2", "--w-max", "2"],
    "add": ["--method", "add", "--steps", "1", "--student-timesteps", "2", "--synthetic-steps", "2",
            "--r1-weight", "0.01"],
    "dmd": ["--method", "dmd", "--steps", "1", "--gan-weight", "0.1"],
    "sds": ["--method", "sds", "--steps", "1"],
}
# Flux-dev's guidance input is its guidance embedding: LCM trains on a range of scales there too.
WITH_RANGE = {**METHODS, "lcm": [*METHODS["lcm"][:-4], "--w-min", "1", "--w-max", "3"]}
FAMILY_METHODS = {"sd3": METHODS, "sdxl": WITH_RANGE, "flux": WITH_RANGE}
PIPELINES = {"sd3": ("StableDiffusion3Pipeline", "transformer"), "sdxl": ("StableDiffusionXLPipeline", "unet"),
             "flux": ("FluxPipeline", "transformer")}
# FluxPipeline's default size is fixed at 128 latent pixels: the tiny teacher's native 32 px is given.
SIZES = {"flux": {"height": 32, "width": 32}}

# A process that never imports diffdistill loads every export with plain diffusers and samples each once at its
# step count and recommended guidance_scale, counting the network's calls and their batch.
PLAIN_DIFFUSERS = r"""
import sys, json, torch
from diffusers import DiffusionPipeline
out = {}
for folder, steps, guidance, net, size in json.loads(sys.argv[1]):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    getattr(pipe, net).register_forward_pre_hook(
        lambda m, a, k: calls.append((a[0] if a else k["hidden_states"]).shape[0]), with_kwargs=True)
    img = pipe("a handwritten digit 7", num_inference_steps=steps, guidance_scale=guidance, output_type="np",
               **size).images
    out[folder] = {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__, "calls": len(calls),
                   "batch": max(calls), "shape": list(img.shape),
                   "finite": bool(torch.isfinite(torch.from_numpy(img)).all())}
assert "diffdistill" not in sys.modules
print(json.dumps(out))
"""


def _plain_load(exports: list) -> dict:
    r = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, json.dumps(exports)], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", ["sd3", "sdxl", "flux"])
def test_every_method_trains_exports_and_loads_in_plain_diffusers(family, request, tmp_path, one_thread):
    teacher = request.getfixturevalue(f"tiny_{family}")
    pipeline_cls, net = PIPELINES[family]
    exports = []
    for name, args in FAMILY_METHODS[family].items():
        out = tmp_path / name
        assert main(["distill", "--teacher", teacher, "--output", str(out), *BASE, *args]) == 0, name
        info = json.loads((out / "pipeline" / "diffdistill.json").read_text())
        exports.append([str(out / "pipeline"), info["num_inference_steps"], info["recommended_guidance_scale"], net,
                        SIZES.get(family, {})])
        if family != "sdxl":  # flow exports: only progressive students step deterministically (as they trained)
            config = json.loads((out / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
            assert config["stochastic_sampling"] == (name != "progressive"), name
            card = (out / "pipeline" / "README.md").read_text()
            assert ("torch.manual_seed" in card) == (config["stochastic_sampling"] and info["num_inference_steps"] > 1)
        if name == "lcm_lora":
            from safetensors.torch import load_file

            lora = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
            assert lora and all(k.startswith(f"{net}.") for k in lora), name
    loaded = _plain_load(exports)
    for folder, steps, *_ in exports:
        info = loaded[folder]
        assert info["pipeline"] == pipeline_cls, folder
        # one pass of one image per step: the guidance is in the student (embedding or baked), never a CFG pass
        assert info["calls"] == steps and info["batch"] == 1 and info["finite"], (folder, info)
        assert info["shape"] == [1, 32, 32, 3], folder
        if family != "sdxl":
            assert info["scheduler"] == "FlowMatchEulerDiscreteScheduler", folder


def test_sd3_lora_loads_into_the_teacher_pipeline_and_equals_the_fused_export(tiny_sd3, tmp_path, one_thread):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "lora-run"
    assert main(["distill", "--teacher", tiny_sd3, "--output", str(out), *BASE, *METHODS["lcm_lora"]]) == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.load_lora_weights(str(out / "lora"))
    fused = StableDiffusion3Pipeline.from_pretrained(str(out / "pipeline")).transformer
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 5, 32),
              pooled_projections=torch.randn(1, 32))
    with torch.no_grad():
        a, b = pipe.transformer(x, **kw).sample, fused(x, **kw).sample
        base = StableDiffusion3Pipeline.from_pretrained(tiny_sd3).transformer(x, **kw).sample
    from tolerance import assert_close_at_scale

    assert_close_at_scale(a, b)
    assert (a - base).abs().max() > 1e-6  # the LoRA was trained: it changes the teacher


def _bad_run(teacher, tmp_path, capsys, *extra) -> str:
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["distill", "--teacher", str(teacher), "--output", str(out), *BASE, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not out.exists()
    return err


def test_unsupported_pipeline_class_is_one_line_naming_the_supported(tmp_path, capsys):
    folder = tmp_path / "kandinsky"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    err = _bad_run(folder, tmp_path, capsys, *METHODS["lcm"])
    assert "KandinskyV22Pipeline" in err and "StableDiffusionPipeline" in err and "StableDiffusion3Pipeline" in err


def test_flow_teacher_without_shift_in_its_scheduler_config_is_refused(tiny_sd3, tmp_path, capsys):
    teacher = tmp_path / "noshift"
    shutil.copytree(tiny_sd3, teacher)
    cfg_path = teacher / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["shift"]
    cfg_path.write_text(json.dumps(cfg))
    assert "has no 'shift'" in _bad_run(teacher, tmp_path, capsys, *METHODS["lcm"])


def test_guidance_range_on_a_teacher_without_guidance_embedding_is_refused(tiny_sd3, tmp_path, capsys):
    args = ["--method", "lcm", "--steps", "2", "--num-ddim-timesteps", "10", "--w-min", "1", "--w-max", "2"]
    assert "no guidance embedding" in _bad_run(tiny_sd3, tmp_path, capsys, *args)


def test_dmd2_few_step_student_on_a_flow_teacher_exports_a_sampler_that_renoises_as_it_trained(tiny_sd3, tmp_path,
                                                                                             one_thread):
    """Backward simulation re-noises the student's x0 to the next grid level with fresh noise; the flow export
    does the same (stochastic_sampling) at the same levels (the call's sigmas: the training grid)."""
    from diffusers import DiffusionPipeline

    from diffdistill.methods.score import student_timestep_grid
    from diffdistill.teachers import load_teacher

    out = tmp_path / "run"
    assert main(["distill", "--teacher", tiny_sd3, "--output", str(out), *BASE, "--method", "dmd", "--steps", "2",
                 "--regression-weight", "0"]) == 0
    info = json.loads((out / "pipeline" / "diffdistill.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(str(out / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.stochastic_sampling and info["num_inference_steps"] == 2
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(float(k["timestep"][0])),
                                                      with_kwargs=True)
    pipe("a digit 3", num_inference_steps=2, guidance_scale=1.0, output_type="latent", **info["call_kwargs"])
    hook.remove()
    schedule = load_teacher(tiny_sd3).schedule
    grid = schedule.sigma_at(student_timestep_grid(schedule.num_train_timesteps, 2)).float()
    torch.testing.assert_close(torch.tensor(seen) / 1000, grid, rtol=0, atol=2e-6)


def test_flux_without_guidance_input_refuses_a_teacher_guidance_needing_two_passes(tmp_path, capsys):
    from diffdistill.tiny_pipelines import save_flux_pipeline

    schnell = save_flux_pipeline(tmp_path / "schnell", guidance_embeds=False)
    err = _bad_run(schnell, tmp_path, capsys, *METHODS["dmd"])  # dmd's teacher guidance defaults to 2
    assert "two CFG passes" in err and "(2.0, 2.0)" in err


def test_flux_denoiser_call_is_what_flux_pipeline_computes(tiny_flux):
    """Packed latents, image/text ids, timestep sigma, the guidance input: the adapter's call gives the
    transformer's output as FluxPipeline calls it, unpacked back to the latent grid."""
    from diffusers import FluxPipeline

    from diffdistill.teachers import load_teacher

    teacher = load_teacher(tiny_flux)
    assert teacher.family == "flux" and teacher.guidance_input and teacher.latent_shape == (4, 8, 8)
    cond = teacher.encode_prompts(["a digit 3"])
    tokens, pooled, text_ids = teacher.pipe.encode_prompt(["a digit 3"], None)
    x, t, w = torch.randn(1, 4, 8, 8), torch.tensor([700]), torch.tensor([3.5])
    with torch.no_grad():
        v = teacher.denoiser().model_output(x, t, cond, w)
        sigma = teacher.schedule.sigma_at(t).float()
        ref = teacher.unet(hidden_states=FluxPipeline._pack_latents(x, 1, 4, 8, 8), timestep=sigma, guidance=w,
                           pooled_projections=pooled, encoder_hidden_states=tokens, txt_ids=text_ids,
                           img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)).sample
    torch.testing.assert_close(v, FluxPipeline._unpack_latents(ref, 32, 32, 4))
    # guidance is an input, not a second pass: a guided call is one call of batch 1
    calls = []
    hook = teacher.unet.register_forward_pre_hook(lambda m, a, k: calls.append(k["hidden_states"].shape[0]),
                                                  with_kwargs=True)
    teacher.denoiser().x0_eps(x, t, cond, teacher.encode_prompts([""]), guidance_scale=3.5)
    hook.remove()
    assert calls == [1]


def test_sd3_teacher_conditioning_is_what_the_pipeline_computes(tiny_sd3):
    """The packed conditioning holds StableDiffusion3Pipeline.encode_prompt's tokens and pooled embedding, and
    the adapter's denoiser call gives the pipeline's own transformer output at sigma * 1000."""
    from diffdistill.teachers import load_teacher

    teacher = load_teacher(tiny_sd3)
    assert Path(tiny_sd3).exists() and teacher.family == "sd3" and teacher.prediction_type == "flow"
    cond = teacher.encode_prompts(["a digit 3", "a digit 5"])
    tokens, _, pooled, _ = teacher.pipe.encode_prompt(["a digit 3", "a digit 5"], None, None,
                                                      do_classifier_free_guidance=False)
    torch.testing.assert_close(cond[:, :-1], tokens)
    torch.testing.assert_close(cond[:, -1, : pooled.shape[1]], pooled)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 400])
    with torch.no_grad():
        v = teacher.denoiser().model_output(x, t, cond)
        ref = teacher.unet(hidden_states=x, timestep=teacher.schedule.sigma_at(t).float() * 1000,
                           encoder_hidden_states=tokens, pooled_projections=pooled).sample
    torch.testing.assert_close(v, ref)
    # the scheduler's own training sigmas, shifted by its shift (3.0)
    torch.testing.assert_close(teacher.schedule.sigmas.flip(0).float(), teacher.scheduler.sigmas, rtol=0, atol=1e-6)


def test_sd3_without_t5_folds_the_zero_t5_rows_into_one_token_exactly(tmp_path, one_thread):
    """Without T5 the pipeline appends 256 identical zero rows; the adapter and bench fold them into one token with
    log(256) on its attention logit. The adapter's velocity equals the transformer's on the unfolded tokens, and a
    pipeline call with ``folded_call_kwargs`` gives a plain call's images (float rounding apart)."""
    from diffusers import DiffusionPipeline, SD3Transformer2DModel

    from diffdistill.eval.sampling import load_pipeline
    from diffdistill.teachers import load_teacher
    from diffdistill.teachers.sd3 import folded_call_kwargs
    from diffdistill.tiny_pipelines import save_sd3_pipeline

    folder = save_sd3_pipeline(tmp_path / "no-t5", t5=False)
    teacher = load_teacher(folder)
    prompts = ["a handwritten digit 3", ""]
    cond = teacher.encode_prompts(prompts)
    tokens, _, pooled, _ = teacher.pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
    assert teacher.t5_rows_folded == 256 and cond.shape[1] == tokens.shape[1] - 255 + 1  # + the pooled row
    plain_net = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 400])
    with torch.no_grad():
        v = teacher.denoiser().model_output(x, t, cond)
        ref = plain_net(hidden_states=x, timestep=teacher.schedule.sigma_at(t).float() * 1000,
                        encoder_hidden_states=tokens, pooled_projections=pooled).sample
    torch.testing.assert_close(v, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())

    pipe = load_pipeline(folder, torch.device("cpu"), torch.float32)  # the null T5 slots are told to diffusers
    call = {"num_inference_steps": 3, "guidance_scale": 2.0, "output_type": "pt"}
    plain = pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in range(2)], **call).images
    kwargs = folded_call_kwargs(pipe)
    assert kwargs == {"max_sequence_length": 1, "joint_attention_kwargs": {"last_token_repeats": 256}}
    folded = pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in range(2)], **call, **kwargs).images
    torch.testing.assert_close(folded, plain, rtol=0, atol=1e-4)
    with_t5 = DiffusionPipeline.from_pretrained(save_sd3_pipeline(tmp_path / "t5"))
    assert folded_call_kwargs(with_t5) == {}  # real T5 tokens differ: nothing to fold


def test_sd3_without_t5_trains_and_its_card_names_the_absent_encoder(tmp_path, one_thread):
    """text_encoder_3 null in model_index.json (SD3 run without T5): the teacher loads, the export is verified with
    text_encoder_3=None, tokenizer_3=None (diffusers needs them named), and the card's usage line names them."""
    from diffusers import DiffusionPipeline

    from diffdistill.tiny_pipelines import save_sd3_pipeline

    teacher = save_sd3_pipeline(tmp_path / "no-t5", t5=False)
    out = tmp_path / "run"
    assert main(["distill", "--teacher", teacher, "--output", str(out), *BASE, *METHODS["sds"]]) == 0
    card = (out / "pipeline" / "README.md").read_text()
    assert "text_encoder_3=None, tokenizer_3=None" in card and "guidance_scale=1.0" in card
    pipe = DiffusionPipeline.from_pretrained(str(out / "pipeline"), text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None
    img = pipe("a digit 1", num_inference_steps=1, guidance_scale=1.0, output_type="np").images
    assert img.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_flow_export_samples_at_the_students_training_noise_levels(tiny_flux, tiny_sd3, tmp_path, family, steps):
    """A flow student's export, called as its card says (``diffdistill.json`` ``call_kwargs``), steps through
    exactly the noise levels an N-step student trained at: ``lcm_grid(T, N)`` (lcm, add, dmd; ``trailing_grid``
    of progressive is the same grid here). Flux: FluxPipeline's own linspace(1, 1/N, N) shifted by mu is that grid.
    SD3: StableDiffusion3Pipeline's default is not (1.0 -> 0.009 at 2 steps): the export gives ``sigmas``.
    The transformer's timestep input is recorded (Flux: sigma; SD3: sigma * 1000)."""
    from diffusers import DiffusionPipeline

    from diffdistill.export import export_pipeline
    from diffdistill.solvers import lcm_grid, trailing_grid
    from diffdistill.teachers import load_teacher

    teacher = load_teacher(tiny_flux if family == "flux" else tiny_sd3)
    folder = export_pipeline(teacher, teacher.unet, teacher.consistency_scheduler(teacher.scheduler, steps, 10.0),
                             tmp_path / "export", steps, 1.0, {}, "a digit 3")
    info = json.loads((folder / "diffdistill.json").read_text())
    assert ("sigmas" in info.get("call_kwargs", {})) == (family == "sd3" and steps >= 2)
    # bench samples every step count at the arguments the export states for it
    from diffdistill.eval.config import read_call_kwargs

    for n in (1, 2, 4, 8):
        assert read_call_kwargs(folder, n) == teacher.sample_kwargs(n)
    pipe = DiffusionPipeline.from_pretrained(str(folder), **teacher.reload_kwargs())
    pipe.set_progress_bar_config(disable=True)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(float(k["timestep"][0])),
                                                      with_kwargs=True)
    pipe("a digit 3", num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
         generator=torch.Generator().manual_seed(0), **info.get("call_kwargs", {}))
    hook.remove()
    scale = 1.0 if family == "flux" else 1000.0
    T = teacher.schedule.num_train_timesteps
    for grid in (lcm_grid(T, steps).flip(0), trailing_grid(T, steps)[:-1]):
        torch.testing.assert_close(torch.tensor(seen) / scale, teacher.schedule.sigma_at(grid).float(), rtol=0,
                                   atol=2e-6)

    # Between steps the student's x0 is noised afresh (stochastic_sampling, plain diffusers), from torch's global
    # RNG: the pipeline passes no generator to the scheduler. One step ends on x0 and draws nothing that counts.
    assert pipe.scheduler.config.stochastic_sampling

    def sample(global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        return pipe("a digit 3", num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **info.get("call_kwargs", {})).images

    a, b, c = sample(1), sample(1), sample(2)
    assert torch.equal(a, b) and torch.equal(a, c) == (steps == 1)
    # bench seeds that noise per batch: the same images whatever the global RNG's state before
    from diffdistill.eval.sampling import sample_cell

    cells = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        cells.append(sample_cell(pipe, ["a digit 3", "a digit 4"], steps, 1.0, 7, 2, torch.device("cpu"),
                                 call_kwargs=read_call_kwargs(folder, steps))[0])
    assert torch.equal(cells[0], cells[1])
