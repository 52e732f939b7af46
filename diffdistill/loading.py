"""Reading diffusers pipeline folders: a one-line check of the layout, and quiet loading (no per-component bars)."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from .errors import UserError, first_line, require


def check_pipeline_folder(path: str | Path, what: str = "pipeline folder") -> dict:
    """The model_index.json of a saved diffusers pipeline folder; a one-line UserError for anything else."""
    folder = Path(path)
    require(folder.exists(), f"{what} not found: {folder}")
    require(folder.is_dir(), f"{what} {folder} is a file, not a diffusers pipeline folder (a single-file "
                             "checkpoint is a .safetensors file)")
    index_file = folder / "model_index.json"
    require(index_file.is_file(), f"{what} {folder} is not a diffusers pipeline (no model_index.json)")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{index_file} is not valid JSON ({e})") from None
    require(isinstance(index, dict) and "_class_name" in index, f"{index_file} has no _class_name")
    for name, spec in index.items():
        # Components are [library, class]; [null, null] marks an absent optional one (e.g. safety_checker).
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        require((folder / name).is_dir(), f"{folder}: component folder {name}/ listed in model_index.json is missing")
    return index


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# Components a family's folder may leave out (null in model_index.json, e.g. SD3 run without T5), which
# from_pretrained must be told (diffusers does not count them as optional).
OPTIONAL_PARTS = ("text_encoder_3", "tokenizer_3")


def absent_parts(model_index: dict) -> dict:
    """{name: None} for each optional component that ``model_index`` (a pipeline's model_index.json) leaves out:
    the keyword arguments ``DiffusionPipeline.from_pretrained`` of that folder needs."""
    def null(entry) -> bool:
        return entry is None or (isinstance(entry, (list, tuple)) and all(v is None for v in entry))

    return {k: None for k in OPTIONAL_PARTS if k in model_index and null(model_index[k])}


def is_hub_id(source: str) -> bool:
    """A hub id (``owner/name``) that is not a local path."""
    return not Path(source).exists() and HUB_ID.match(source) is not None


def hub_kwargs(revision: str, local_files_only: bool) -> dict:
    """from_pretrained / download arguments for a hub id; HF_HUB_OFFLINE=1 counts as --local-files-only."""
    return {"revision": revision or None,
            "local_files_only": local_files_only or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")}


def refused_pickle(e: BaseException) -> str | None:
    """When ``e`` (or what caused it) is torch.load refusing a pickle under ``weights_only=True``: one line saying
    so, which file and which global it asked for; else None."""
    import pickle

    chain, x = [], e
    while x is not None and len(chain) < 20:
        chain.append(x)
        x = x.__cause__ or x.__context__
    refusal = next((x for x in chain if isinstance(x, pickle.UnpicklingError)), None)
    if refusal is None:
        return None
    text = " ".join(str(x) for x in chain)
    wanted = re.search(r"GLOBAL (\S+)", text)
    file = re.search(r"'([^']+\.(?:bin|pt|pth|ckpt))'", text)
    return (f"refused the pickled weights file {file.group(1) if file else ''}".rstrip() + ": it asks to "
            + (f"call {wanted.group(1)}" if wanted else "build objects that are not tensors")
            + " while loading, which could run any code, so weights_only=True unpickling stopped; "
            "use safetensors weights, or .bin weights from a source you trust converted to safetensors")


def load_error_line(e: BaseException) -> str:
    """One line for a failed from_pretrained: a refused pickle said as such, else the first line of the error."""
    return refused_pickle(e) or first_line(e)


def local_pipeline(source: str, revision: str, variant: str, local_files_only: bool, what: str,
                   single_file_config: str = "") -> str:
    """A local diffusers pipeline folder for ``source``, checked (layout, weights of ``variant``): the folder
    itself, the hub snapshot of a hub id (downloaded unless ``local_files_only``), or a single-file checkpoint
    converted with ``single_file_config`` (``single_file_folder``); one-line UserErrors."""
    if is_single_file(source) and single_file_config:
        return single_file_folder(source, single_file_config, what)
    if is_hub_id(source):
        from diffusers import DiffusionPipeline

        try:
            with quiet_loading():
                source = str(DiffusionPipeline.download(source, variant=variant or None,
                                                        **hub_kwargs(revision, local_files_only)))
        except Exception as e:  # noqa: BLE001 - any download failure becomes one line for the user
            raise UserError(f"cannot fetch {what} {source!r} from the hub: {first_line(e)}") from None
    check_pipeline_folder(source, what)
    check_variant(source, variant, what)
    return source


SINGLE_FILE_HELP = ("diffusers Stable Diffusion folder whose configs, tokenizer and scheduler a single-file "
                    "checkpoint (one .safetensors in the original SD layout) is read with: one of the same family "
                    "and size")


def is_single_file(source: str) -> bool:
    """A local file given where a pipeline is expected: a single-file checkpoint (or a mistake)."""
    return Path(source).is_file()


def load_single_file(path: str, config: str, what: str, **kwargs):
    """``StableDiffusionPipeline.from_single_file(path, config=config, local_files_only=True, **kwargs)``, offline,
    with one-line UserErrors: a file that is not .safetensors (a pickled .ckpt is refused), a config that is no
    Stable Diffusion folder, weights that do not fit the config's architecture."""
    from diffusers import StableDiffusionPipeline

    require(Path(path).suffix == ".safetensors",
            f"{what} {path} is a file but not a .safetensors single-file checkpoint (a .ckpt or .pt file is a pickle, "
            "which could run any code when loaded: convert it to .safetensors from a source you trust)")
    index = check_pipeline_folder(config, "--single-file-config folder")
    require(index.get("_class_name") == "StableDiffusionPipeline",
            f"--single-file-config {config} is a {index.get('_class_name')}, not a StableDiffusionPipeline folder")
    hint = f"--single-file-config must name a diffusers folder of the same family and size as {path}"
    try:
        with quiet_loading():
            pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                            **kwargs)
    except Exception as e:  # noqa: BLE001 - diffusers raises ValueError, KeyError, its own errors: one line each
        # diffusers' size-mismatch message goes on to advise overwriting the weights with random ones: cut that
        reason = first_line(e).split(" If you want to instead overwrite")[0].rstrip(".")
        reason = re.sub(r"^Cannot load +because ", "the config's ", reason)
        raise UserError(f"cannot load {what} {path} with the configs of {config}: {reason}; {hint}") from None
    empty = [name for name in ("unet", "vae", "text_encoder")
             if any(p.device.type == "meta" for p in getattr(pipe, name).parameters())]
    require(not empty, f"cannot load {what} {path} with the configs of {config}: the file holds no weights for "
                       f"parts of its {', '.join(empty)}; {hint}")
    return pipe


def single_file_folder(path: str, config: str, what: str) -> str:
    """A single-file checkpoint converted to a diffusers folder (``<temporary>/<file stem>``, removed when the
    process exits) with the config folder's diffdistill.json, for code that reads pipeline folders (bench)."""
    import atexit
    import shutil
    import tempfile

    pipe = load_single_file(path, config, what)
    root = tempfile.mkdtemp(prefix="diffdistill-single-file-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    folder = Path(root) / Path(path).stem
    with quiet_loading():
        pipe.save_pretrained(str(folder), safe_serialization=True)
    marker = Path(config) / "diffdistill.json"
    if marker.is_file():  # the family's marker (e.g. digits: the bench's default reference and prompts)
        shutil.copyfile(marker, folder / marker.name)
    return str(folder)


def weight_variants(folder: str | Path) -> dict[str, set[str]]:
    """Component name -> the weight variants its folder holds ("" for plain ``model.safetensors``, "fp16" for
    ``model.fp16.safetensors``; shards and .bin files alike); components without weight files are left out."""
    found: dict[str, set[str]] = {}
    for f in Path(folder).glob("*/*"):
        parts = f.name.split(".")
        if len(parts) < 2 or parts[-1] not in ("safetensors", "bin"):
            continue
        variant = re.sub(r"-\d+-of-\d+$", "", parts[-2]) if len(parts) > 2 else ""
        found.setdefault(f.parent.name, set()).add(variant)
    return found


def check_variant(folder: str | Path, variant: str, what: str) -> None:
    """One-line UserError, before diffusers' own "no file named ..." message, when a local pipeline folder has no
    weights of ``variant`` ("" = the plain ones) for some component: names the --variant to pass instead."""
    for component, variants in sorted(weight_variants(folder).items()):
        if variant in variants:
            continue
        others = ", ".join(sorted(v or "plain" for v in variants))
        hint = (f"pass --variant {sorted(variants)[0]}" if not variant and len(variants) == 1
                else "drop --variant" if "" in variants else f"pass --variant with one of: {others}")
        raise UserError(f"{what} {folder}: {component}/ holds only {others} weights, no "
                        f"{variant or 'plain (no variant)'} ones; {hint}")


def _not_a_safetensors_fallback(record) -> bool:
    """False for diffusers' error record of a missing .safetensors file before it falls back to the .bin one."""
    return not record.getMessage().startswith("An error occurred while trying to fetch")


@contextlib.contextmanager
def quiet_loading():
    """Inside the block, diffusers/transformers show no loading bars and log errors only (but not diffusers'
    "An error occurred while trying to fetch" for a component with .bin weights only, which it then loads)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    bars = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    levels = (dlog.get_verbosity(), tlog.get_verbosity())
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    models_log = dlog.get_logger("diffusers.models.modeling_utils")
    models_log.addFilter(_not_a_safetensors_fallback)
    try:
        yield
    finally:
        models_log.removeFilter(_not_a_safetensors_fallback)
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()
