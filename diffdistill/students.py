"""Students: trainable copies of the teacher UNet, and the guidance embedding an exported student carries."""

from __future__ import annotations

import torch

from .errors import UserError, require
from .loading import quiet_loading

# Width of the guidance embedding given to guidance-distilled students (LCM and SD-Turbo style).
GUIDANCE_EMBED_DIM = 256


def student_from_teacher(teacher_unet, time_cond_proj_dim: int | None = None):
    """A trainable copy of the teacher UNet; with ``time_cond_proj_dim`` it gains a guidance embedding.

    The new ``cond_proj`` layer is zero-initialised, so the student starts out as exactly the teacher.
    """
    from diffusers import UNet2DConditionModel

    config = dict(teacher_unet.config)
    if time_cond_proj_dim is not None:
        config["time_cond_proj_dim"] = time_cond_proj_dim
    with quiet_loading():
        student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    allowed = {"time_embedding.cond_proj.weight"}
    require(not unexpected and set(missing) <= allowed,
            f"teacher UNet does not match its own config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if student.time_embedding.cond_proj is not None and "time_embedding.cond_proj.weight" in missing:
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    with quiet_loading():
        student.to(device=teacher_unet.device, dtype=torch.float32)
    student.train()
    student.requires_grad_(True)
    return student


def with_inert_guidance_embedding(unet):
    """``unet`` itself if it has a guidance embedding, else an equal copy with one that has no effect.

    StableDiffusionPipeline skips its unconditional pass for a UNet with ``time_cond_proj_dim``; a student
    whose guidance is baked into its weights (ADD, DMD, LCM-LoRA fused, ...) then gives the same images in
    one pass per step at any ``guidance_scale``, diffusers' default 7.5 included, instead of being guided
    a second time. The added ``cond_proj`` is zero, so the outputs are exactly the student's.
    """
    if unet.config.time_cond_proj_dim is not None:
        return unet
    return student_from_teacher(unet, GUIDANCE_EMBED_DIM).eval().requires_grad_(False)


def guidance_is_baked(unet) -> bool:
    """True when the UNet's guidance embedding is absent or all zero: ``guidance_scale`` cannot change its output."""
    proj = getattr(unet.time_embedding, "cond_proj", None)
    return proj is None or not bool(proj.weight.detach().abs().max() > 0)


# --- compressed students (knowledge distillation, BK-SDM style) ---------------------------------------------------

STUDENT_ARCHS = ("identity", "base", "small", "tiny")
# UNet2DConditionModel config keys that may hold one value per down block (dropped with a stage).
PER_BLOCK_KEYS = ("block_out_channels", "layers_per_block", "transformer_layers_per_block", "attention_head_dim",
                  "num_attention_heads", "cross_attention_dim", "only_cross_attention",
                  "reverse_transformer_layers_per_block")


def _fewer_layers(value):
    """One resnet (+ attention) layer fewer per block, at least one (BK-SDM-Small)."""
    return [max(1, n - 1) for n in value] if isinstance(value, list | tuple) else max(1, value - 1)


def _without_innermost_stage(config: dict) -> dict:
    """``config`` with its innermost down stage and the matching (first) up stage dropped (BK-SDM-Tiny)."""
    n = len(config["down_block_types"])
    require(n >= 2, f"--student-arch tiny drops the innermost stage, but the teacher UNet has only {n}")
    config["down_block_types"] = list(config["down_block_types"])[:-1]
    config["up_block_types"] = list(config["up_block_types"])[1:]
    for key in PER_BLOCK_KEYS:
        value = config.get(key)
        if isinstance(value, list | tuple) and len(value) == n:
            config[key] = list(value)[:-1]
    return config


PLAIN_BLOCKS = {"CrossAttnDownBlock2D": "DownBlock2D", "CrossAttnUpBlock2D": "UpBlock2D",
                "UNetMidBlock2DCrossAttn": "UNetMidBlock2D"}


def _without_attention(config: dict, blocks: list[str]) -> dict:
    """``config`` with the attention layers of ``blocks`` (``down.i``, ``mid``, ``up.j``) dropped: their
    cross-attention block types replaced by the plain ones."""
    for name in blocks:
        kind, _, idx = name.partition(".")
        key = {"down": "down_block_types", "up": "up_block_types"}.get(kind)
        types = list(config[key]) if key else None
        ok = (kind == "mid" and config.get("mid_block_type") is not None) or \
            (key is not None and idx.isdigit() and int(idx) < len(types))
        require(ok, f"--drop-attention {name}: the student has no such block (down.0.., mid, up.0..)")
        current = config["mid_block_type"] if kind == "mid" else types[int(idx)]
        require(current in PLAIN_BLOCKS, f"--drop-attention {name}: a {current} has no attention to drop")
        if kind == "mid":
            config["mid_block_type"] = PLAIN_BLOCKS[current]
        else:
            types[int(idx)] = PLAIN_BLOCKS[current]
            config[key] = types
    return config


def student_unet_config(teacher_config: dict, arch: str, width: float = 1.0,
                        drop_attention: list[str] | tuple = ()) -> dict:
    """The UNet2DConditionModel config of a compressed student of a teacher with ``teacher_config``.

    ``arch``: identity; base (BK-SDM-Base: no mid block); small (+ one resnet/attention layer fewer per down block,
    at least one: diffusers gives every up block one layer more than its down block); tiny (+ the innermost
    down/up stage dropped); or a UNet config .json file whose keys replace the teacher's. ``width`` multiplies every
    block's channels, rounded to a multiple of the norm group size; ``drop_attention`` names blocks of the result
    whose attention layers are dropped."""
    import json
    from pathlib import Path

    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(teacher_config).items()}
    if arch.endswith(".json"):
        require(Path(arch).is_file(), f"--student-arch {arch}: no such UNet config file")
        try:
            override = json.loads(Path(arch).read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"--student-arch {arch} is not valid JSON ({e})") from None
        require(isinstance(override, dict), f"--student-arch {arch} must hold a JSON object of UNet config keys")
        config.update({k: v for k, v in override.items() if not k.startswith("_")})
    else:
        require(arch in STUDENT_ARCHS, f"--student-arch must be one of {', '.join(STUDENT_ARCHS)} or a UNet config "
                                       f".json file, got {arch!r}")
        if arch in ("base", "small", "tiny"):
            config["mid_block_type"] = None
        if arch in ("small", "tiny"):
            config["layers_per_block"] = _fewer_layers(config["layers_per_block"])
        if arch == "tiny":
            config = _without_innermost_stage(config)
    config = _without_attention(config, list(drop_attention))
    if width != 1.0:
        groups = config.get("norm_num_groups") or 32
        config["block_out_channels"] = [max(groups, round(c * width / groups) * groups)
                                        for c in config["block_out_channels"]]
    return config


def student_block_map(teacher_config: dict, student_config: dict) -> dict[str, str]:
    """Student block name -> the teacher block it stands for (``down.i``, ``mid``, ``up.j``): down stages pair from
    the outermost, up stages from the outermost too (a student with fewer stages lacks the innermost ones)."""
    n_t, n_s = len(teacher_config["down_block_types"]), len(student_config["down_block_types"])
    pairs = {f"down.{i}": f"down.{i}" for i in range(min(n_t, n_s))}
    if student_config.get("mid_block_type") is not None and teacher_config.get("mid_block_type") is not None:
        pairs["mid"] = "mid"
    pairs.update({f"up.{j}": f"up.{j + n_t - n_s}" for j in range(max(0, n_s - n_t), n_s)})
    return pairs


def _module_path(block: str) -> str:
    """``down.0`` -> ``down_blocks.0``, ``mid`` -> ``mid_block``."""
    kind, _, idx = block.partition(".")
    return "mid_block" if kind == "mid" else f"{kind}_blocks.{idx}"


def copy_units(unet) -> dict[str, torch.nn.Module]:
    """The units weights are copied by: every top-level part outside the blocks, the mid block whole, and each
    resnet / attention / resampler of the down and up blocks (name -> module)."""
    units = {name: m for name, m in unet.named_children()
             if name not in ("down_blocks", "up_blocks", "mid_block") and any(True for _ in m.parameters())}
    if unet.mid_block is not None:
        units["mid_block"] = unet.mid_block
    for kind in ("down_blocks", "up_blocks"):
        for i, block in enumerate(getattr(unet, kind)):
            for part, children in block.named_children():
                if isinstance(children, torch.nn.ModuleList):
                    units.update({f"{kind}.{i}.{part}.{k}": m for k, m in enumerate(children)})
    return units


def copy_matching_weights(teacher_unet, student_unet, block_map: dict[str, str]) -> list[str]:
    """Copy the teacher's weights into every student unit (``copy_units``) whose teacher counterpart (through
    ``block_map``) has exactly the same parameter names and shapes; returns the names of the copied units."""
    teacher_units = copy_units(teacher_unet)
    renames = {_module_path(s): _module_path(t) for s, t in block_map.items()}
    copied = []
    for name, unit in copy_units(student_unet).items():
        head = next((p for p in renames if name == p or name.startswith(p + ".")), None)
        t_name = renames[head] + name[len(head):] if head else name
        if head is None and name.split(".")[0] in ("down_blocks", "up_blocks", "mid_block"):
            continue  # a block with no teacher counterpart
        source = teacher_units.get(t_name)
        if source is None:
            continue
        ts, ss = source.state_dict(), unit.state_dict()
        if ts.keys() == ss.keys() and all(ts[k].shape == ss[k].shape for k in ss):
            unit.load_state_dict(ts)
            copied.append(name)
    return copied


def compressed_student(teacher_unet, arch: str, width: float = 1.0, drop_attention: list[str] | tuple = ()):
    """(student UNet2DConditionModel, block map, copied units): the student of ``student_unet_config``, initialised
    by copying the teacher's weights wherever a kept unit's shapes match exactly (BK-SDM), trainable, float32."""
    from diffusers import UNet2DConditionModel

    config = student_unet_config(teacher_unet.config, arch, width, drop_attention)
    try:
        with quiet_loading():
            student = UNet2DConditionModel.from_config(config)
    except (TypeError, ValueError, KeyError, AssertionError) as e:
        raise UserError(f"--student-arch {arch}: not a valid UNet2DConditionModel config ({e})") from None
    block_map = student_block_map(teacher_unet.config, student.config)
    copied = copy_matching_weights(teacher_unet, student, block_map)  # load_state_dict casts to float32
    with quiet_loading():
        student.to(device=teacher_unet.device, dtype=torch.float32)
    student.train().requires_grad_(True)
    return student, block_map, copied


def without_inert_guidance_embedding(unet):
    """``unet`` without a guidance embedding when its embedding is inert (all zero, as exports of baked-guidance
    students carry it): the plain student it was exported from. Else ``unet`` itself."""
    from diffusers import UNet2DConditionModel

    if unet.config.time_cond_proj_dim is None or not guidance_is_baked(unet):
        return unet
    with quiet_loading():
        plain = UNet2DConditionModel.from_config({**dict(unet.config), "time_cond_proj_dim": None})
    state = {k: v for k, v in unet.state_dict().items() if k != "time_embedding.cond_proj.weight"}
    plain.load_state_dict(state)
    return plain.to(device=unet.device, dtype=unet.dtype)


def load_student_unet(folder: str, teacher_unet, raw: bool = False):
    """The UNet of ``--student-from`` (a pipeline folder, e.g. a ``kd`` export), frozen, float32, on the teacher's
    device; it must take and give the teacher's latents and text embeddings. An inert guidance embedding is removed
    (``raw=False``), so step distillation starts from the plain compressed student."""
    from diffusers import UNet2DConditionModel

    from .loading import check_pipeline_folder, load_error_line

    index = check_pipeline_folder(folder, what="--student-from")
    require(index.get("unet", [None, None])[1] == "UNet2DConditionModel",
            f"--student-from {folder}: its unet is not a UNet2DConditionModel")
    try:
        with quiet_loading():
            unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    except Exception as e:  # noqa: BLE001 - any load failure is one line for the user
        raise UserError(f"--student-from {folder}: cannot load its unet: {load_error_line(e)}") from None
    for key in ("in_channels", "out_channels", "sample_size", "cross_attention_dim"):
        require(unet.config[key] == teacher_unet.config[key],
                f"--student-from {folder}: its UNet's {key} is {unet.config[key]}, the teacher's "
                f"{teacher_unet.config[key]}")
    if not raw:
        unet = without_inert_guidance_embedding(unet)
    with quiet_loading():
        unet.to(device=teacher_unet.device, dtype=torch.float32)
    return unet.eval().requires_grad_(False)
