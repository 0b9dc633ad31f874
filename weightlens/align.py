"""Match teacher and student keys (DESIGN §4 "Keys are aligned automatically").

Steps, each reported: restrict a whole-pipeline file to its denoiser (the rest, VAE, text
encoders, EMA copy, noise-schedule buffers, is counted as *skipped*, never as unaligned) and
strip common prefixes (`model.diffusion_model.`, `unet.`, `transformer.`, `module.`...);
optionally read the EMA copy (`model_ema.*`) of an original LDM checkpoint instead; rename
original LDM/SD U-Net keys to diffusers names with diffusers' own converter; apply user
`--map` rules to student keys; filter with include/exclude globs; pair by name and sort what
could not be paired into only-in-teacher, only-in-student and shape mismatches.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from weightlens.errors import AlignmentError, OptionError
from weightlens.io import TensorInfo

__all__ = ["AlignOptions", "AlignedKey", "Alignment", "canonical_names", "align_keys"]

log = logging.getLogger(__name__)

COMPONENT_PREFIXES = ("model.diffusion_model.", "unet.", "transformer.")
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "base_model.model.")
LDM_MARKERS = ("input_blocks.", "middle_block.", "output_blocks.")
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_EMA_PREFIX = "model_ema."
# What the non-denoiser parts of whole-pipeline single files are (for the skipped-keys note).
SKIPPED_GROUPS = (
    ("first_stage_model.", "VAE"),
    ("cond_stage_model.", "text encoder"),
    ("conditioner.embedders.", "text encoders"),
    ("text_encoders.", "text encoders"),
    ("model_ema.", "EMA copy"),
    ("model.diffusion_model.", "non-EMA U-Net"),
    ("vae.", "VAE"),
    ("text_encoder", "text encoder"),
)


@dataclass(frozen=True)
class AlignOptions:
    """User controls over alignment.

    Attributes:
        strip_prefix: extra prefixes to remove from both sides' keys (tried first).
        include: glob patterns on aligned names; empty keeps all.
        exclude: glob patterns on aligned names to drop.
        maps: `REGEX=REPLACEMENT` rules applied to the student's names (after auto-renaming).
        ema: read the EMA copy of the U-Net (`model_ema.*`) from original LDM checkpoints
            that store one, instead of the training weights (`model.diffusion_model.*`).
    """

    strip_prefix: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    maps: tuple[str, ...] = ()
    ema: bool = False


@dataclass(frozen=True)
class AlignedKey:
    """One tensor present in both checkpoints."""

    name: str
    teacher_key: str
    student_key: str
    shape: tuple[int, ...]
    teacher_dtype: str
    student_dtype: str

    @property
    def kind(self) -> str:
        """linear | conv | embedding | vector (ndim < 2) | tensor (other ndim)."""
        if len(self.shape) < 2:
            return "vector"
        if len(self.shape) == 4:
            return "conv"
        if len(self.shape) == 2:
            return "embedding" if re.search(r"(^|\.)(\w*embedding|emb|embed_tokens)\.weight$", self.name) and "linear" not in self.name else "linear"
        return "tensor"


@dataclass(frozen=True)
class Alignment:
    """The result of matching two key sets."""

    pairs: tuple[AlignedKey, ...]
    only_in_teacher: tuple[str, ...]
    only_in_student: tuple[str, ...]
    shape_mismatch: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
    dtype_diff: tuple[tuple[str, str, str], ...]
    notes: tuple[str, ...] = field(default=())
    teacher_params: int = 0
    skipped_teacher: tuple[str, ...] = ()
    skipped_student: tuple[str, ...] = ()


def _describe_skipped(keys: Sequence[str]) -> str:
    """`12 first_stage_model.* (VAE), 3 top-level buffers`: what a file held besides the denoiser."""
    counts: dict[str, int] = {}
    for key in keys:
        group = next((f"{p}* ({what})" for p, what in SKIPPED_GROUPS if key.startswith(p)), None)
        if group is None:
            group = f"{key.split('.')[0]}.*" if "." in key else "top-level buffers (noise schedule...)"
        counts[group] = counts.get(group, 0) + 1
    return ", ".join(f"{n} {g}" for g, n in sorted(counts.items(), key=lambda gn: (-gn[1], gn[0])))


def _ema_keys(inside: dict[str, str], keys: set[str], side: str, notes: list[str]) -> dict[str, str]:
    """Swap each `model.diffusion_model.X` for its EMA copy.

    LDM's LitEma stores `model.diffusion_model.a.b.c` as `model_ema.diffusion_modelabc` (the
    path after `model.` with its dots removed), as diffusers' `convert_ldm_unet_checkpoint`
    reads it with `extract_ema=True`.
    """
    ema = {n: LDM_EMA_PREFIX + "".join(k.split(".")[1:]) for n, k in inside.items()}
    missing = sorted(n for n, k in ema.items() if k not in keys)
    if missing:
        raise AlignmentError(f"{side}: --ema: {len(missing)} of {len(ema)} U-Net weights have no EMA copy (e.g. {missing[0]!r} has no {ema[missing[0]]!r}); the file's EMA is incomplete: compare without --ema")
    notes.append(f"{side}: read the EMA copy ({LDM_EMA_PREFIX}*) of the {len(ema)} U-Net weights")
    return ema


def _strip(keys: list[str], options: AlignOptions, notes: list[str], side: str) -> tuple[dict[str, str], list[str]]:
    """Map canonical name -> original key after component selection and prefix stripping.

    Also returns the keys left out because they belong to other pipeline components.
    """
    names = {k: k for k in keys}
    for prefix in options.strip_prefix:
        if names and all(n.startswith(prefix) for n in names):
            names = {n[len(prefix):]: k for n, k in names.items()}
            notes.append(f"{side}: stripped prefix {prefix!r}")
    skipped: list[str] = []
    for prefix in COMPONENT_PREFIXES:
        inside = {n: k for n, k in names.items() if n.startswith(prefix)}
        if inside:
            names = {n[len(prefix):]: k for n, k in inside.items()}
            if prefix == LDM_UNET_PREFIX and options.ema:
                if any(k.startswith(LDM_EMA_PREFIX) for k in keys):
                    names = _ema_keys(names, set(keys), side, notes)
                else:
                    notes.append(f"{side}: --ema, but this file holds no EMA copy; read its U-Net weights")
            used = set(names.values())
            skipped = [k for k in keys if k not in used]
            notes.append(f"{side}: kept the {len(inside)} keys under {prefix!r}" + (f", skipped {len(skipped)} other keys: {_describe_skipped(skipped)}" if skipped else ""))
            if not options.ema and sum(k.startswith(LDM_EMA_PREFIX) for k in skipped) > 2:
                notes.append(f"{side}: the file also holds an EMA copy of the U-Net ({LDM_EMA_PREFIX}*); pass --ema to compare it instead")
            break
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if names and all(n.startswith(prefix) for n in names):
                names = {n[len(prefix):]: k for n, k in names.items()}
                notes.append(f"{side}: stripped prefix {prefix!r}")
                changed = True
    return names, skipped


def _is_ldm(names: Mapping[str, str]) -> bool:
    return any(n.startswith(LDM_MARKERS) for n in names)


def _ldm_config(ldm_names: Sequence[str], other_names: Sequence[str]) -> dict[str, object]:
    """The few config fields diffusers' LDM U-Net converter reads, inferred from keys."""
    ops = sorted(int(m.group(1)) for n in ldm_names if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", n)))
    n_in = len({n.split(".")[1] for n in ldm_names if n.startswith("input_blocks.")})
    config: dict[str, object] = {"layers_per_block": (ops[0] - 1) if ops else max(n_in - 1, 1)}
    if "label_emb.0.0.weight" in ldm_names:
        if any(n.startswith("class_embedding.") for n in other_names):
            config["class_embed_type"] = "projection"
        else:
            config["addition_embed_type"] = "text_time"
    if "label_emb.weight" in ldm_names:
        config["num_class_embeds"] = 1
    return config


def _ldm_to_diffusers(names: dict[str, str], other: Sequence[str], notes: list[str], side: str) -> dict[str, str]:
    """Rename LDM U-Net names with diffusers' converter (fed key strings, not tensors)."""
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    fake = {LDM_UNET_KEY + n: n for n in names}
    try:
        converted = convert_ldm_unet_checkpoint(fake, _ldm_config(list(names), other))
    except Exception as exc:  # the converter raises KeyError/IndexError on unusual layouts
        notes.append(f"{side}: LDM-style keys, but diffusers' converter failed ({exc!r}); kept original names")
        return names
    renamed = {new: names[old] for new, old in converted.items() if isinstance(old, str)}
    unmapped = set(names) - set(converted.values())
    for n in sorted(unmapped):
        renamed.setdefault(n, names[n])
    notes.append(f"{side}: renamed {len(converted)} LDM keys to diffusers names (diffusers' converter); {len(unmapped)} left as they were")
    return renamed


def _apply_maps(names: dict[str, str], maps: Sequence[str]) -> dict[str, str]:
    out = dict(names)
    for rule in maps:
        if "=" not in rule:
            raise OptionError(f"--map {rule!r}: expected REGEX=REPLACEMENT, e.g. --map 'attn_(\\d)=attn\\1'")
        pattern, repl = rule.split("=", 1)
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise OptionError(f"--map {rule!r}: bad regular expression ({exc})") from None
        out = {rx.sub(repl, n): k for n, k in out.items()}
    return out


def _select(infos: Mapping[str, TensorInfo], options: AlignOptions, side: str, other: Sequence[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """Canonical names, notes and skipped keys of one checkpoint."""
    notes: list[str] = []
    names, skipped = _strip(list(infos), options, notes, side)
    if _is_ldm(names):
        names = _ldm_to_diffusers(names, other, notes, side)
    return names, notes, skipped


def canonical_names(infos: Mapping[str, TensorInfo], options: AlignOptions, side: str, other: Sequence[str] = ()) -> tuple[dict[str, str], list[str]]:
    """Canonical (diffusers-style) name -> stored key for one checkpoint, with notes."""
    names, notes, _ = _select(infos, options, side, other)
    return names, notes


def _keep(name: str, options: AlignOptions) -> bool:
    if options.include and not any(fnmatch.fnmatchcase(name, g) for g in options.include):
        return False
    return not any(fnmatch.fnmatchcase(name, g) for g in options.exclude)


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) < 2:
        return shape
    rest = 1
    for d in shape[1:]:
        rest *= d
    return (shape[0], rest)


def align_keys(teacher: Mapping[str, TensorInfo], student: Mapping[str, TensorInfo], options: AlignOptions = AlignOptions()) -> Alignment:
    """Pair teacher and student tensors by canonical name.

    Raises:
        AlignmentError: when nothing aligns, with the closest hints.
    """
    if options.ema and not any(k.startswith(LDM_EMA_PREFIX) for infos in (teacher, student) for k in infos):
        raise OptionError(f"--ema: neither checkpoint holds EMA weights ({LDM_EMA_PREFIX}*, as original LDM .ckpt files do); compare without --ema")
    t_names, t_notes, t_skipped = _select(teacher, options, "teacher", ())
    s_names, s_notes, s_skipped = _select(student, options, "student", list(t_names))
    s_names = _apply_maps(s_names, options.maps)
    t_all = dict(t_names)
    t_names = {n: k for n, k in t_names.items() if _keep(n, options)}
    s_names = {n: k for n, k in s_names.items() if _keep(n, options)}
    pairs, mismatch, dtypes = [], [], []
    for name in sorted(set(t_names) & set(s_names)):
        ti, si = teacher[t_names[name]], student[s_names[name]]
        if _matrix_shape(ti.shape) != _matrix_shape(si.shape):
            mismatch.append((name, ti.shape, si.shape))
            continue
        if ti.dtype != si.dtype:
            dtypes.append((name, ti.dtype, si.dtype))
        pairs.append(AlignedKey(name, t_names[name], s_names[name], ti.shape, ti.dtype, si.dtype))
    result = Alignment(
        pairs=tuple(pairs),
        only_in_teacher=tuple(sorted(set(t_names) - set(s_names))),
        only_in_student=tuple(sorted(set(s_names) - set(t_names))),
        shape_mismatch=tuple(mismatch),
        dtype_diff=tuple(dtypes),
        notes=tuple(t_notes + s_notes),
        teacher_params=sum(teacher[k].numel for k in t_all.values()),
        skipped_teacher=tuple(t_skipped),
        skipped_student=tuple(s_skipped),
    )
    if not any(p.kind != "vector" for p in pairs):
        t_ex = ", ".join(list(t_names)[:3]) or "none"
        s_ex = ", ".join(list(s_names)[:3]) or "none"
        why = f"{len(mismatch)} names match but every shape differs" if mismatch else "no key names match"
        raise AlignmentError(f"no weight matrices align between teacher and student ({why}; teacher keys look like [{t_ex}], student keys like [{s_ex}]); use --strip-prefix, --map REGEX=REPLACEMENT or --include to line them up")
    return result
