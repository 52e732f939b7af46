"""Knowledge distillation into a smaller UNet (Kim et al. 2023, "BK-SDM: A Lightweight, Fast, and Cheap Version
of Stable Diffusion"; feature KD after Romero et al. 2015, "FitNets").

Step distillation cuts the number of network calls; this cuts the cost of each call. A compressed student of the
teacher's own family (mid block dropped, fewer layers per block, the innermost stage dropped, thinner channels:
``--student-arch`` / ``--student-width``) starts from the teacher's weights wherever a kept unit's shapes match
(``students.compressed_student``) and is trained on

    L = w_task * L_task + lambda * L_outKD + alpha * sum_k || h_T^(k) - P_k(h_S^(k)) ||^2       (BK-SDM eq. 1-3)

L_task is the ordinary denoising loss on real data (the student's prediction against the true noise, or v),
L_outKD the distance between student and teacher predictions on the same noisy input, and the last term the
distance between the teacher's and the student's block outputs, through a 1x1 projection P_k where their widths
differ (``features.ChannelProjections``). The student keeps the teacher's sampler and is guided by the pipeline's
classifier-free guidance like the teacher, so prompts are dropped to "" with ``--prompt-dropout`` to keep the
unconditional prediction trained. It can then be the starting point of step distillation: ``--student-from``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import RunConfig, opt
from ..denoiser import from_x0_eps
from ..errors import require
from ..features import ChannelProjections, FeatureTaps, stage_modules, unet_block_shapes
from ..students import STUDENT_ARCHS, compressed_student, student_block_map, student_unet_config
from .base import DistillMethod, require_unet_family


@dataclass
class KDConfig:
    """Options of knowledge distillation into a compressed student (``--method kd``)."""

    student_arch: str = opt("base", f"student architecture: {', '.join(STUDENT_ARCHS)} (BK-SDM: base drops the mid "
                                    "block, small also one resnet/attention layer per down block (at least one), tiny "
                                    "also the innermost down/up stage), or a UNet config .json whose keys replace the "
                                    "teacher's")
    student_width: float = opt(1.0, "multiplier of every block's channels, rounded to the norm group size (below 1 "
                                    "no block keeps the teacher's shapes, so none is copied)")
    drop_attention: str = opt("", "student blocks whose attention layers are dropped, comma separated (down.0, mid, "
                                  "up.1, ...: cross-attention block types become plain ones)")
    task_weight: float = opt(1.0, "weight of L_task, the denoising loss on real data")
    output_kd_weight: float = opt(1.0, "lambda: weight of the output KD term, student vs teacher prediction on the "
                                       "same noisy input (BK-SDM: 1)")
    feature_kd_weight: float = opt(0.5, "alpha: weight of the feature KD term, the summed mean squared distance "
                                        "between tapped block outputs (BK-SDM: 1; 0 turns it off)")
    kd_blocks: str = opt("", "student blocks whose outputs feature KD matches to their teacher counterparts, comma "
                             "separated (down.0, mid, up.1, ...; '': every block whose counterpart has the same "
                             "resolution)")
    prompt_dropout: float = opt(0.1, "probability that a training prompt is replaced by the empty one, so the "
                                     "student's unconditional prediction (classifier-free guidance) is trained too")

    def __post_init__(self):
        require(bool(self.student_arch), "--student-arch must not be empty")
        require(0 < self.student_width <= 1, f"--student-width must be in (0, 1], got {self.student_width}")
        for name in ("task_weight", "output_kd_weight", "feature_kd_weight"):
            require(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        require(self.task_weight + self.output_kd_weight + self.feature_kd_weight > 0,
                "--task-weight, --output-kd-weight and --feature-kd-weight are all 0: nothing to train on")
        require(0 <= self.prompt_dropout < 1, f"--prompt-dropout must be in [0, 1), got {self.prompt_dropout}")

    def block_names(self) -> list[str]:
        """The --kd-blocks names ([]: the default choice)."""
        return _names(self.kd_blocks)

    def attention_dropped(self) -> list[str]:
        """The --drop-attention block names."""
        return _names(self.drop_attention)


def _names(text: str) -> list[str]:
    return [b.strip() for b in text.split(",") if b.strip()]


def recommended_guidance(pipeline: str, default: float) -> float:
    """The guidance_scale a pipeline folder's diffdistill.json recommends (digits-SD: 1.5), else ``default``
    (diffusers' 7.5 for a plain teacher)."""
    info = Path(pipeline) / "diffdistill.json"
    with contextlib.suppress(OSError, ValueError, KeyError, AttributeError, TypeError):
        return float(json.loads(info.read_text())["recommended_guidance_scale"])
    return default


def feature_pairs(teacher_config, student_config, chosen: list[str]) -> dict[str, tuple[str, int, int]]:
    """Student block -> (teacher block, student width, teacher width) for feature KD: the ``chosen`` student blocks
    (every paired block of the same resolution when empty); a chosen block without a partner at its resolution is a
    one-line UserError."""
    pairs = student_block_map(teacher_config, student_config)
    s_shapes, t_shapes = unet_block_shapes(student_config), unet_block_shapes(teacher_config)
    same_size = {s: t for s, t in pairs.items() if s_shapes[s][1] == t_shapes[t][1]}
    unknown = [b for b in chosen if b not in s_shapes]
    require(not unknown, f"--kd-blocks: the student has no block {', '.join(unknown)}; it has {', '.join(s_shapes)}")
    unmatched = [b for b in chosen if b not in same_size]
    require(not unmatched, f"--kd-blocks {', '.join(unmatched)}: no teacher block of the same resolution to match; "
                           f"choose from {', '.join(same_size) or 'none'}")
    names = chosen or list(same_size)
    return {s: (same_size[s], s_shapes[s][0], t_shapes[same_size[s]][0]) for s in names}


def feature_kd_loss(teacher_feats: dict[str, torch.Tensor], student_feats: dict[str, torch.Tensor],
                    pairs: dict[str, tuple[str, int, int]], project) -> torch.Tensor:
    """sum_k mean || h_T^(k) - P_k(h_S^(k)) ||^2 over the feature pairs (student name -> teacher name, ...)."""
    terms = [F.mse_loss(project(s, student_feats[s].float()), teacher_feats[t].float())
             for s, (t, _, _) in pairs.items()]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def kd_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, target: torch.Tensor, feature_term: torch.Tensor,
            cfg: KDConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = w_task ||s - target||^2 + lambda ||s - teacher||^2 + alpha * feature_term (means over elements);
    predictions (B, C, h, w) in the teacher's prediction type."""
    task = F.mse_loss(student_out.float(), target.float())
    out_kd = F.mse_loss(student_out.float(), teacher_out.float())
    loss = cfg.task_weight * task + cfg.output_kd_weight * out_kd + cfg.feature_kd_weight * feature_term
    logs = {"loss": loss.detach(), "task": task.detach(), "output_kd": out_kd.detach(),
            "feature_kd": feature_term.detach()}
    return loss, logs


class FeatureKDMethod(DistillMethod):
    """A method with one phase that trains its student together with feature KD's projections (kd, tiny-decoder)."""

    def __init__(self, cfg, run: RunConfig):
        super().__init__(cfg, run)
        self.projections: ChannelProjections | None = None

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        mods = {"student": self.student}
        if len(self.projections.convs):  # DDP refuses a module without parameters
            mods["projections"] = self.projections
        return mods

    def set_trainable_modules(self, modules: dict[str, torch.nn.Module]) -> None:
        self.student = modules["student"]
        self.projections = modules.get("projections", self.projections)

    def parameters(self, phase: str) -> list[torch.nn.Parameter]:
        return [p for m in self.trainable_modules().values() for p in m.parameters() if p.requires_grad]


class KnowledgeDistillation(FeatureKDMethod):
    """``--method kd``: a compressed student trained on real data, the teacher's outputs and its block features."""

    name = "kd"

    def __init__(self, cfg: KDConfig, run: RunConfig):
        super().__init__(cfg, run)
        self.copied: list[str] = []
        self.pairs: dict[str, tuple[str, int, int]] = {}

    def default_guidance_scale(self) -> float:
        return recommended_guidance(self.run.teacher, 7.5)  # the student is guided like its teacher

    def needs_cfg(self) -> bool:
        return True

    def needs_images(self) -> str | None:
        return "knowledge distillation (its task loss)"

    def validate(self, teacher) -> None:
        from diffusers import UNet2DConditionModel

        require_unet_family(teacher, "--method kd")
        kind = type(teacher.unet).__name__
        require(isinstance(teacher.unet, UNet2DConditionModel),
                f"--method kd compresses UNet2DConditionModel teachers; {self.run.teacher}'s denoiser is a {kind}, "
                "which kd cannot apply to yet")
        require(not self.run.student_from or (self.cfg.student_arch == "identity" and self.cfg.student_width == 1
                                              and not self.cfg.drop_attention),
                "--student-from gives kd its student: --student-arch must then be identity, without --student-width "
                "or --drop-attention")
        if not self.run.student_from:
            config = student_unet_config(teacher.unet.config, self.cfg.student_arch, self.cfg.student_width,
                                         self.cfg.attention_dropped())
            feature_pairs(teacher.unet.config, config, self.cfg.block_names())

    def setup(self, teacher) -> None:
        from ..students import student_from_teacher

        self.teacher = teacher
        if self.run.student_from:  # a compressed student trained further (its own weights, nothing copied)
            self.student = student_from_teacher(self.initial_unet(teacher))
        else:
            self.student, _, self.copied = compressed_student(teacher.unet, self.cfg.student_arch,
                                                              self.cfg.student_width, self.cfg.attention_dropped())
        self.pairs = feature_pairs(teacher.unet.config, self.student.config, self.cfg.block_names())
        if self.cfg.feature_kd_weight == 0:
            self.pairs = {}
        self.projections = ChannelProjections({s: (c_s, c_t) for s, (_, c_s, c_t) in self.pairs.items()})
        self.projections.to(teacher.unet.device)
        self.teacher_taps = FeatureTaps(stage_modules(teacher.unet, [t for t, _, _ in self.pairs.values()]))
        self.student_taps = FeatureTaps(stage_modules(self.student, list(self.pairs)))

    def loss(self, phase: str, batch: dict, step: int):
        teacher = self.teacher
        enc = teacher.encode_batch(batch, self.needs_images())
        x0, cond = enc["latents"], enc["cond"]
        b = x0.shape[0]
        dropped = torch.rand(b, device=x0.device) < self.cfg.prompt_dropout
        cond = torch.where(dropped[:, None, None], enc["uncond"].expand_as(cond), cond)
        t = torch.randint(0, teacher.schedule.num_train_timesteps, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = teacher.schedule.add_noise(x0, noise, t)
        alpha, sigma = teacher.schedule.alpha_sigma(t, like=x0)
        target = from_x0_eps(x0, noise, alpha, sigma, teacher.prediction_type)  # (B, C, h, w)
        with torch.no_grad(), self.teacher_taps.capture():
            teacher_out = teacher.denoiser().model_output(x_t, t, cond)
        with self.student_taps.capture():
            student_out = teacher.denoiser(self.student).model_output(x_t, t, cond)
        features = feature_kd_loss(self.teacher_taps.features, self.student_taps.features, self.pairs,
                                   self.projections).to(x0.device)
        return kd_loss(student_out, teacher_out, target, features, self.cfg)

    def export_scheduler(self, teacher_scheduler):
        return type(teacher_scheduler).from_config(teacher_scheduler.config)  # the teacher's sampler, as it is

    def card_details(self) -> dict:
        unet = self.unwrap(self.student)
        n_s = sum(p.numel() for p in unet.parameters())
        n_t = sum(p.numel() for p in self.teacher.unet.parameters())
        c = self.cfg
        arch = f"from {self.run.student_from}" if self.run.student_from else \
            f"{c.student_arch}, width x{c.student_width}" + (f", no attention in {c.drop_attention}" if c.drop_attention else "")
        return {
            "student": f"compressed UNet ({arch}): {n_s:,} parameters, {100 * n_s / n_t:.1f}% of the teacher's {n_t:,}",
            "initialised from the teacher": f"{len(self.copied)} units copied" if self.copied else "nothing copied",
            "loss": f"{c.task_weight} x task + {c.output_kd_weight} x output KD + {c.feature_kd_weight} x feature KD "
                    f"({', '.join(self.pairs) or 'no blocks'})",
            "sampling": "the teacher's scheduler, classifier-free guidance as for the teacher",
        }
