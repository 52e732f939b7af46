"""The SD3/SD3.5 teacher adapter: ``SD3Transformer2DModel`` (MMDiT) on the flow-matching process, two CLIP
text encoders plus an optional T5 (``text_encoder_3=None``: its tokens are zeros, as diffusers runs it).

The conditioning the methods batch is one tensor (B, L + 1, D): the joint text tokens (CLIP pair padded to D,
then T5) and, as the last row, the pooled CLIP embedding (B, P) zero-padded to D (P <= D for SD3: 2048 and
4096). The transformer has no guidance embedding: students distil one teacher guidance scale into their
weights and the export is sampled with guidance_scale 1 (one pass per step).
"""

from __future__ import annotations

import math

import torch

from ..denoiser import FlowMatchSchedule
from ..errors import UserError, require
from .sd import Teacher

# peft target modules of a LoRA on an MMDiT: the image and the text streams' attention projections
# (diffusers' SD3 DreamBooth-LoRA default).
TRANSFORMER_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out"]


def pack_conditioning(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(B, L, D) tokens + (B, P) pooled -> (B, L + 1, D), the pooled vector zero-padded as the last row."""
    require(pooled.shape[-1] <= tokens.shape[-1],
            f"pooled width {pooled.shape[-1]} exceeds the token width {tokens.shape[-1]}: cannot pack the conditioning")
    return torch.cat([tokens, torch.nn.functional.pad(pooled, (0, tokens.shape[-1] - pooled.shape[-1]))[:, None]], 1)


class FoldedTokensJointAttnProcessor:
    """SD3's joint attention (the computation of diffusers' ``JointAttnProcessor2_0``) where the last text token
    may stand for ``last_token_repeats`` identical copies of itself.

    SD3 run without T5 (``text_encoder_3=None``) appends ``max_sequence_length`` (256) rows of zeros to the CLIP
    tokens. Identical text tokens stay identical through every block (each is a function of itself and of the
    shared attention context), so one of them with log(n) added to its attention logit, as a key, gives every
    query exactly the attention of n copies: the same transformer output at a fraction of the text stream's
    cost (16 + 1 tokens instead of 16 + 256 for digits-flow). ``last_token_repeats=1`` is plain joint attention.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 last_token_repeats: int = 1, **kwargs):
        batch, n_image = hidden_states.shape[:2]

        def split_heads(x, norm=None):
            x = x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return x if norm is None else norm(x)

        query = split_heads(attn.to_q(hidden_states), attn.norm_q)
        key = split_heads(attn.to_k(hidden_states), attn.norm_k)
        value = split_heads(attn.to_v(hidden_states))
        bias = None
        if encoder_hidden_states is not None:
            query = torch.cat([query, split_heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], 2)
            key = torch.cat([key, split_heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], 2)
            value = torch.cat([value, split_heads(attn.add_v_proj(encoder_hidden_states))], 2)
            if last_token_repeats > 1:
                bias = torch.zeros(1, key.shape[2], dtype=query.dtype, device=query.device)
                bias[:, -1] = math.log(last_token_repeats)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(query.dtype)
        image = attn.to_out[1](attn.to_out[0](out[:, :n_image]))
        if encoder_hidden_states is None:
            return image
        text = out[:, n_image:]
        return image, (text if attn.context_pre_only else attn.to_add_out(text))


def fold_absent_t5(pipe_or_transformer) -> None:
    """Give the transformer (of a pipeline) ``FoldedTokensJointAttnProcessor`` on every attention, once."""
    net = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    for attr in ("module", "_orig_mod"):  # DistributedDataParallel, torch.compile
        net = getattr(net, attr, net)
    if not getattr(net, "_diffdistill_folded_tokens", False):
        net.set_attn_processor(FoldedTokensJointAttnProcessor())
        net._diffdistill_folded_tokens = True


def folded_call_kwargs(pipe, max_sequence_length: int = 256) -> dict:
    """For a StableDiffusion3Pipeline without T5: install the folding attention and return the call arguments
    that give its default output (``max_sequence_length`` zero T5 rows) with the zero rows folded into one;
    {} for any other pipeline."""
    if type(pipe).__name__ != "StableDiffusion3Pipeline" or pipe.text_encoder_3 is not None:
        return {}
    fold_absent_t5(pipe)
    return {"max_sequence_length": 1, "joint_attention_kwargs": {"last_token_repeats": max_sequence_length}}


def flow_euler_preset(teacher_scheduler, stochastic: bool = False):
    """FlowMatchEulerDiscreteScheduler with the teacher's shift (one step: sigma 1 -> 0, the noise level every
    one-step student trains on; more steps: diffusers' shifted grid, see the README's flow-matching section).
    ``stochastic``: each step goes to the next noise level with fresh noise around the network's x0
    (``stochastic_sampling``: consistency-style multi-step sampling) instead of along its velocity."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..solvers import scheduler_from_config

    return scheduler_from_config(FlowMatchEulerDiscreteScheduler, teacher_scheduler.config,
                                 use_karras_sigmas=False, use_exponential_sigmas=False,
                                 use_beta_sigmas=False, invert_sigmas=False, stochastic_sampling=stochastic)


def student_grid_call_kwargs(num_train_timesteps: int, steps: int) -> dict:
    """A StableDiffusion3Pipeline call's arguments that sample at an N-step student's training noise levels: the
    unshifted sigmas (t + 1) / T on ``lcm_grid(T, N)``, descending, which the scheduler shifts ({} for one step:
    sigma 1 -> 0 is the pipeline's own)."""
    if steps < 2:
        return {}
    from ..solvers import lcm_grid

    T = num_train_timesteps
    return {"sigmas": [float(t + 1) / T for t in lcm_grid(T, steps).flip(0).tolist()]}


class SD3Teacher(Teacher):
    """A frozen SD3/SD3.5 teacher (StableDiffusion3Pipeline)."""

    family = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    lora_targets = TRANSFORMER_LORA_TARGETS
    lora_layers_key = "transformer_lora_layers"
    guidance_embedding = False
    prediction_type_of_family = "flow"
    # diffusers' default T5 length in StableDiffusion3Pipeline.__call__: training conditions on the same tokens
    max_sequence_length = 256

    @staticmethod
    def flow_schedule(pipe) -> FlowMatchSchedule:
        """The teacher's flow-matching training schedule (static shift; SD3 has no dynamic shifting)."""
        return FlowMatchSchedule.from_scheduler(pipe.scheduler)

    @classmethod
    def check_folder(cls, folder) -> None:
        """The scheduler config must state the timestep shift the teacher was trained with: diffusers would
        silently fill in 1.0 (no shift), and every noise level of the distillation would be off."""
        import json
        from pathlib import Path

        path = Path(folder) / "scheduler" / "scheduler_config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            raise UserError(f"teacher {folder}: cannot read {path}") from None
        require("shift" in config or config.get("use_dynamic_shifting", False),
                f"teacher {folder}: {path} has no 'shift' (the flow-matching teacher's timestep shift, e.g. 3.0 for SD3)")

    @property
    def unet(self):
        """The denoising network: the MMDiT transformer."""
        return self.pipe.transformer

    def frozen_parts(self) -> list[torch.nn.Module]:
        encoders = [self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3]
        return [self.pipe.transformer, self.pipe.vae, *(e for e in encoders if e is not None)]

    @property
    def cond_dim(self) -> int:
        return self.unet.config.joint_attention_dim

    @property
    def t5_rows_folded(self) -> int:
        """How many identical zero T5 rows the conditioning's last token stands for: ``max_sequence_length``
        without T5 (``FoldedTokensJointAttnProcessor``), 1 (nothing folded) with it."""
        return self.max_sequence_length if self.pipe.text_encoder_3 is None else 1

    def net_call(self, net, x_t, timestep, cond, timestep_cond=None):
        """SD3Transformer2DModel(hidden_states, timestep = sigma * 1000, joint tokens, pooled) -> velocity."""
        pooled = cond[:, -1, : self.unet.config.pooled_projection_dim]
        kwargs = {}
        if self.t5_rows_folded > 1:
            fold_absent_t5(net)
            kwargs["joint_attention_kwargs"] = {"last_token_repeats": self.t5_rows_folded}
        return net(hidden_states=x_t, timestep=timestep, encoder_hidden_states=cond[:, :-1],
                   pooled_projections=pooled, return_dict=False, **kwargs)[0]

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        """StableDiffusion3Pipeline.encode_prompt, packed (module docstring): (B, L + 1, D); without T5 its
        zero rows folded into one (``t5_rows_folded``)."""
        device = self.pipe.text_encoder.device
        length = 1 if self.t5_rows_folded > 1 else self.max_sequence_length
        tokens, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=device,
                                                       do_classifier_free_guidance=False, max_sequence_length=length)
        return pack_conditioning(tokens, pooled)

    def make_student(self, time_cond_proj_dim: int | None = None, start=None):
        """A trainable float32 copy of the transformer (it has no guidance embedding to add)."""
        require(start is None or start is self.unet, f"the {self.family} student copies the teacher's network")
        from ..loading import quiet_loading

        require(time_cond_proj_dim is None, f"the {self.family} transformer has no guidance embedding: distil one "
                                            "teacher guidance scale (--w-min equal to --w-max)")
        with quiet_loading():
            student = type(self.unet).from_config(dict(self.unet.config))
        student.load_state_dict(self.unet.state_dict())
        with quiet_loading():
            student.to(device=self.unet.device, dtype=torch.float32)
        return student.train().requires_grad_(True)

    def export_net(self, net, inert_guidance: bool = True):
        return net

    def guidance_baked(self, net, inert_guidance: bool = True) -> bool:
        return True  # no guidance embedding: the student's guidance is its teacher's scale, in its weights

    net_key = "transformer"

    def build_pipeline(self, net, scheduler, dtype_of_teacher: bool = True, safety: bool = False, vae=None):
        """The family's pipeline (StableDiffusion3Pipeline, FluxPipeline) from the teacher's VAE (or ``vae``), text
        encoders and tokenizers plus ``net``."""
        return self._pipeline_from_parts(net, scheduler, dtype_of_teacher, vae=vae)

    def sample_kwargs(self, steps: int = 1) -> dict:
        """StableDiffusion3Pipeline's default N-step noise levels (a linspace between the scheduler's shifted
        extremes, shifted again: 1.0 -> 0.009 at 2 steps and shift 3) are not the ones an N-step student trained
        at (``lcm_grid(T, N)``: sigma = shift((t + 1) / T), 1.0 -> 0.75). From 2 steps on the call gives the
        grid's unshifted sigmas, which the scheduler shifts (``sigmas=``, a StableDiffusion3Pipeline argument)."""
        return student_grid_call_kwargs(self.schedule.num_train_timesteps, steps)

    def reload_kwargs(self) -> dict:
        return dict(self.absent_parts)

    def consistency_scheduler(self, teacher_scheduler, original_inference_steps: int, timestep_scaling: float):
        """FlowMatchEulerDiscreteScheduler with ``stochastic_sampling``: from each noise level the student's x0 is
        noised afresh to the next level, as consistency (LCM), ADD and DMD students are trained and as LCMScheduler
        samples SD students. Stepping along the student's velocity instead (the deterministic Euler step) reuses
        noise correlated with that x0, which they never saw in training; measured on digits-flow's LCM at 4 steps
        (N = 500, tuning seeds): prompt accuracy 93.8% deterministic, 99.6% stochastic. The pipeline does not pass
        its generator to the scheduler: the fresh noise comes from torch's global RNG (``torch.manual_seed``
        seeds it; ``diffdistill bench`` does, per batch). One step (sigma 1 -> 0) ends on x0 exactly. The boundary
        scalings are ~(0, 1) at every noise level it samples (c_skip < 1e-5 from sigma = 0.02 up), so the
        student's x0 is its consistency output there."""
        return flow_euler_preset(teacher_scheduler, stochastic=True)

    def euler_scheduler(self, teacher_scheduler):
        return flow_euler_preset(teacher_scheduler)


