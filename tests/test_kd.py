"""Knowledge distillation into compressed students (kd) and tiny VAE decoders (tiny-decoder): the identities of the
loss, the shapes the feature taps promise, exactly which weights are copied, and exports plain diffusers loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffdistill.cli import main
from diffdistill.config import RunConfig
from diffdistill.errors import UserError
from diffdistill.features import FeatureTaps, stage_modules, unet_block_shapes
from diffdistill.methods.kd import KDConfig, KnowledgeDistillation
from diffdistill.students import compressed_student, copy_units, student_unet_config
from diffdistill.teachers import load_teacher

RUN = ["--max-train-steps", "2", "--batch-size", "4", "--checkpointing-steps", "0", "--validation-steps", "0",
       "--benchmark-samples", "0", "--lr-warmup-steps", "0"]


@pytest.fixture(scope="module")
def teacher(tiny_sd):
    return load_teacher(tiny_sd)


def _batch(teacher, n=4):
    torch.manual_seed(0)
    return {"pixel_values": torch.rand(n, 3, 32, 32) * 2 - 1, "prompt": [f"a handwritten digit {i}" for i in range(n)]}


def test_kd_terms_are_zero_when_the_student_is_the_teacher(teacher, tiny_sd, one_thread):
    method = KnowledgeDistillation(KDConfig(student_arch="identity"), RunConfig(teacher=tiny_sd))
    method.validate(teacher)
    method.setup(teacher)
    assert set(method.copied) == set(copy_units(teacher.unet))  # every unit copied
    assert set(method.pairs) == {"down.0", "down.1", "mid", "up.0", "up.1"} and not method.projections.convs
    torch.manual_seed(1)
    _, logs = method.loss("student", _batch(teacher), 0)
    assert float(logs["output_kd"]) == 0.0 and float(logs["feature_kd"]) == 0.0
    assert float(logs["task"]) > 0.01  # the denoising loss on data is not: the teacher is untrained
    # A perturbed student: both KD terms become positive.
    with torch.no_grad():
        method.student.up_blocks[1].resnets[0].conv1.weight.add_(0.05)
    _, logs = method.loss("student", _batch(teacher), 0)
    assert float(logs["output_kd"]) > 0 and float(logs["feature_kd"]) > 0


@pytest.mark.parametrize("arch,width", [("base", 1.0), ("tiny", 1.0), ("base", 0.5), ("small", 1.0)])
def test_feature_taps_give_the_promised_shapes(teacher, arch, width, one_thread):
    student, _, _ = compressed_student(teacher.unet, arch, width)
    for unet in (student, teacher.unet):
        promised = unet_block_shapes(unet.config)
        taps = FeatureTaps(stage_modules(unet, list(promised)))
        with torch.no_grad(), taps.capture():
            unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 16, 32))
        assert list(taps.features) == list(promised)
        for name, (c, down) in promised.items():
            assert tuple(taps.features[name].shape) == (2, c, 8 // down, 8 // down), name
        taps.remove()
    assert (student.mid_block is None) == (arch != "identity")


def test_weight_copying_copies_exactly_the_kept_units(teacher):
    student, block_map, copied = compressed_student(teacher.unet, "tiny")
    # One stage (64 channels) is left; the innermost (128) and the mid block are gone. What keeps its shapes: the
    # stem and head, the outer down stage minus its downsampler (the student's last stage has none), and the outer
    # up stage minus its first resnet, which reads 64 + 64 channels instead of 128 + 64.
    assert block_map == {"down.0": "down.0", "up.0": "up.1"}
    expected = {"conv_in", "time_embedding", "conv_norm_out", "conv_out", "down_blocks.0.resnets.0",
                "down_blocks.0.attentions.0", "up_blocks.0.resnets.1", "up_blocks.0.attentions.0",
                "up_blocks.0.attentions.1"}
    assert set(copied) == expected
    t_state, s_state = teacher.unet.state_dict(), student.state_dict()
    for key, value in s_state.items():
        unit = next((u for u in copied if key.startswith(u + ".")), None)
        t_key = key.replace("up_blocks.0.", "up_blocks.1.")
        if unit is not None:
            assert value.equal(t_state[t_key]), key
        elif value.ndim > 1 and t_key in t_state and t_state[t_key].shape == value.shape:
            assert not value.equal(t_state[t_key]), key  # a unit not copied kept its fresh initialisation
    n_s, n_t = sum(p.numel() for p in student.parameters()), sum(p.numel() for p in teacher.unet.parameters())
    assert n_s < 0.5 * n_t
    # thinner channels: nothing that holds channels keeps the teacher's shapes
    _, _, copied_thin = compressed_student(teacher.unet, "base", 0.5)
    assert copied_thin == []


def test_student_arch_errors_are_one_line(teacher, tmp_path):
    with pytest.raises(UserError, match="--student-arch must be one of"):
        student_unet_config(teacher.unet.config, "huge")
    bad = tmp_path / "arch.json"
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="JSON object"):
        student_unet_config(teacher.unet.config, str(bad))
    with pytest.raises(UserError, match="student-width"):
        KDConfig(student_width=1.5)
    method = KnowledgeDistillation(KDConfig(student_arch="tiny", kd_blocks="down.0"), RunConfig(teacher="x"))
    with pytest.raises(UserError, match="no teacher block of the same resolution"):
        method.validate(teacher)


@pytest.mark.parametrize("method", ["kd", "tiny-decoder"])
def test_compressed_students_refuse_a_teacher_of_another_family(method, tiny_sd3, tmp_path, capsys):
    from diffdistill.cli import main

    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["distill", "--teacher", tiny_sd3, "--method", method, "--output", str(out), "--max-train-steps", "1",
                 "--benchmark-samples", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "UNet families" in err and "sd3" in err, err
    assert not out.exists()


@pytest.mark.slow
def test_the_compressed_chain_on_an_sdxl_teacher(tiny_sdxl, tmp_path):
    """SDXL, the other UNet family: kd (tiny architecture) -> lcm from it -> the tiny decoder, each exported as a
    StableDiffusionXLPipeline; the last one holds the compressed UNet (its added text-time conditioning kept) and
    an AutoencoderTiny, and samples in a fresh process with plain diffusers."""
    runs = [("kd", ["--method", "kd", "--student-arch", "tiny", "--steps", "4"]),
            ("lcm", ["--method", "lcm", "--student-from", str(tmp_path / "kd" / "pipeline"), "--steps", "2",
                     "--num-ddim-timesteps", "10"]),
            ("td", ["--method", "tiny-decoder", "--student-from", str(tmp_path / "lcm" / "pipeline"), "--steps", "2"])]
    for name, args in runs:
        assert main(["distill", "--teacher", tiny_sdxl, "--output", str(tmp_path / name), *args, *RUN]) == 0, name
    teacher = json.loads((Path(tiny_sdxl) / "unet" / "config.json").read_text())
    index = json.loads((tmp_path / "td" / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["vae"][1] == "AutoencoderTiny"
    out = _plain_load(tmp_path / "td" / "pipeline", 2)
    assert out["vae"] == "AutoencoderTiny" and out["finite"] and out["calls"] == 2
    assert len(out["unet"]["down_block_types"]) < len(teacher["down_block_types"])
    assert out["unet"]["addition_embed_type"] == "text_time"


PLAIN = r"""
import sys, json, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
calls = []
pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
img = pipe("a handwritten digit 7", num_inference_steps=int(sys.argv[2]), guidance_scale=1.5, output_type="np").images
assert "diffdistill" not in sys.modules
print(json.dumps({"vae": type(pipe.vae).__name__, "unet": dict(pipe.unet.config), "calls": len(calls),
                  "batch": max(calls), "shape": list(img.shape), "scheduler": type(pipe.scheduler).__name__,
                  "finite": bool(torch.isfinite(torch.from_numpy(img)).all())}))
"""


def _plain_load(folder, steps):
    r = subprocess.run([sys.executable, "-c", PLAIN, str(folder), str(steps)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def kd_run(tiny_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("kd") / "run"
    assert main(["distill", "--method", "kd", "--teacher", tiny_sd, "--output", str(out), "--student-arch", "base",
                 "--student-width", "0.5", "--steps", "3", *RUN]) == 0
    return out


@pytest.mark.slow
def test_kd_end_to_end_exports_a_thin_unet_plain_diffusers_loads(kd_run):
    summary = json.loads((kd_run / "summary.json").read_text())
    assert summary["train_steps"] == 2 and set(summary["last_logs"]) >= {"task", "output_kd", "feature_kd"}
    info = _plain_load(kd_run / "pipeline", 3)
    assert info["unet"]["block_out_channels"] == [32, 64] and info["unet"]["mid_block_type"] is None
    assert info["unet"]["time_cond_proj_dim"] is None  # no inert embedding: guided by CFG like the teacher
    assert info["calls"] == 3 and info["batch"] == 2 and info["finite"] and info["scheduler"] == "DDIMScheduler"
    assert info["vae"] == "AutoencoderKL"
    assert "parameters" in (kd_run / "pipeline" / "README.md").read_text()
    # `diffdistill export` of its checkpoint rebuilds the thin student (and its projections) and gives the same UNet
    from safetensors.torch import load_file

    again = kd_run.parent / "export"
    assert main(["export", str(kd_run), "--output", str(again)]) == 0
    a, b = (load_file(str(d / "unet" / "diffusion_pytorch_model.safetensors")) for d in (kd_run / "pipeline", again))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.slow
def test_lcm_student_from_a_compressed_student(kd_run, tiny_sd, tmp_path):
    out = tmp_path / "lcm"
    assert main(["distill", "--method", "lcm", "--teacher", tiny_sd, "--student-from", str(kd_run / "pipeline"),
                 "--output", str(out), "--steps", "2", "--num-ddim-timesteps", "10", "--w-min", "1.5",
                 "--w-max", "1.5", *RUN]) == 0
    info = _plain_load(out / "pipeline", 2)
    # smaller (the kd student's architecture) and few-step (LCM, one pass per step: guidance baked in)
    assert info["unet"]["block_out_channels"] == [32, 64] and info["unet"]["mid_block_type"] is None
    assert info["scheduler"] == "LCMScheduler" and info["calls"] == 2 and info["batch"] == 1 and info["finite"]


def test_student_from_must_fit_the_teacher(tiny_sd, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from diffdistill.tiny_pipelines import TINY_UNET, build_pipeline

    pipe = build_pipeline()
    pipe.unet = UNet2DConditionModel(**{**TINY_UNET, "cross_attention_dim": 16})
    pipe.save_pretrained(str(tmp_path / "other"))
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["distill", "--method", "lcm", "--teacher", tiny_sd, "--student-from", str(tmp_path / "other"),
                 "--output", str(out), *RUN]) == 2
    err = capsys.readouterr().err.strip()
    assert "cross_attention_dim is 16" in err and len(err.splitlines()) == 1 and not out.exists()


def test_pipeline_hands_the_tiny_vae_the_unet_latents(teacher, one_thread):
    """AutoencoderTiny's scaling_factor is 1.0: a pipeline decodes its latents as they are, which is what the
    tiny decoder is trained on (teacher target: the teacher VAE's decode of latents / its own scaling factor)."""
    from diffdistill.export import build_pipeline
    from diffdistill.methods.tiny_decoder import tiny_vae_for

    tiny = tiny_vae_for(teacher.vae, 32, 2).eval()
    assert tiny.config.scaling_factor == 1.0
    pipe = build_pipeline(teacher, teacher.unet, teacher.scheduler, vae=tiny)
    assert pipe.vae_scale_factor == 4
    kw = dict(num_inference_steps=2, guidance_scale=1.0)
    latents = pipe("a handwritten digit 3", generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images
    images = pipe("a handwritten digit 3", generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
    with torch.no_grad():
        direct = (tiny.decode(latents).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, direct, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_tiny_decoder_end_to_end_plain_diffusers_loads_the_tiny_vae(kd_run, tiny_sd, tmp_path):
    out = tmp_path / "taesd"
    assert main(["distill", "--method", "tiny-decoder", "--teacher", tiny_sd, "--output", str(out), "--vae-channels",
                 "16", "--vae-blocks", "1", "--decoder-feature-weight", "0.5", "--steps", "3",
                 "--student-from", str(kd_run / "pipeline"), *RUN]) == 0
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderTiny"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_logs"]["features"] > 0 and summary["last_logs"]["encoder"] > 0
    info = _plain_load(out / "pipeline", 3)
    assert info["vae"] == "AutoencoderTiny" and info["shape"] == [1, 32, 32, 3] and info["finite"]
    # the UNet and scheduler of --student-from (the thin kd student, with CFG: two passes per step)
    assert info["unet"]["block_out_channels"] == [32, 64] and info["batch"] == 2


def test_kd_and_tiny_decoder_recommend_the_guidance_of_the_unet_they_export(tiny_sd, kd_run):
    from diffdistill.methods.tiny_decoder import TinyDecoderConfig, TinyDecoderDistillation

    assert KnowledgeDistillation(KDConfig(), RunConfig(teacher="assets/digits-sd")).recommended_guidance_scale == 1.5
    assert KnowledgeDistillation(KDConfig(), RunConfig(teacher=tiny_sd)).recommended_guidance_scale == 7.5
    run = RunConfig(teacher=tiny_sd, student_from=str(kd_run / "pipeline"))
    assert TinyDecoderDistillation(TinyDecoderConfig(), run).recommended_guidance_scale == 7.5  # kd_run's teacher's


def test_dropped_attention_keeps_the_resnets_copied(teacher, one_thread):
    student, _, copied = compressed_student(teacher.unet, "base", 1.0, ["down.0", "up.1"])
    assert student.config.down_block_types[0] == "DownBlock2D" and student.config.up_block_types[1] == "UpBlock2D"
    assert not any(".attentions." in u for u in copied if u.startswith(("down_blocks.0", "up_blocks.1")))
    assert {"down_blocks.0.resnets.0", "up_blocks.1.resnets.0", "up_blocks.1.resnets.1"} <= set(copied)
    out = student(torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), encoder_hidden_states=torch.randn(2, 16, 32)).sample
    assert out.shape == (2, 4, 8, 8)
    with pytest.raises(UserError, match="has no attention to drop"):
        student_unet_config(teacher.unet.config, "base", drop_attention=["down.1"])
    with pytest.raises(UserError, match="no such block"):
        student_unet_config(teacher.unet.config, "base", drop_attention=["mid"])
