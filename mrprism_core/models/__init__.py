"""Models: ``build_model`` constructs any of them by name; ``split_state`` separates the weights
that federated training shares from those that stay at the site."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any

from torch import Tensor, nn

from ..losses import MrPrismLossConfig
from .base import SegmentationModel, SegmentationOutput
from .config import PRESETS, MrPrismArch, get_preset
from .diff import DiagnosisNotAvailable, DiFF
from .dpersona import DPersona
from .mrnet import MRNet
from .mrprism import MrPrism
from .unet import MultiHeadUNet, UNetMV, UNetStaple

__all__ = [
    "MODEL_NAMES",
    "PRESETS",
    "DPersona",
    "DiFF",
    "DiagnosisNotAvailable",
    "MRNet",
    "MrPrism",
    "MrPrismArch",
    "MultiHeadUNet",
    "SegmentationModel",
    "SegmentationOutput",
    "UNetMV",
    "UNetStaple",
    "build_model",
    "build_model_for_data",
    "check_model_options",
    "split_state",
    "spec_from_build_args",
    "model_from_build_args",
    "norm_layer_names",
]

_LOSS_OPTIONS = {field.name for field in fields(MrPrismLossConfig)}
_ARCH_FIELDS = {field.name for field in fields(MrPrismArch)}


def _build_mrprism(
    arch: MrPrismArch, common: dict[str, int], options: dict[str, Any], build_args: dict
) -> SegmentationModel:
    loss = MrPrismLossConfig(**{k: v for k, v in options.items() if k in _LOSS_OPTIONS})
    return MrPrism(
        common["in_channels"],
        common["num_classes"],
        common["num_raters"],
        arch,
        loss_config=loss,
        local_modules=options.get("local_modules"),
        build_args=build_args,
    )


def _build_unet_mv(
    arch: MrPrismArch, common: dict[str, int], options: dict[str, Any], build_args: dict
) -> SegmentationModel:
    return UNetMV(common["in_channels"], common["num_classes"], arch, build_args=build_args)


def _build_unet_staple(
    arch: MrPrismArch, common: dict[str, int], options: dict[str, Any], build_args: dict
) -> SegmentationModel:
    return UNetStaple(common["in_channels"], common["num_classes"], arch, build_args=build_args)


def _build_multihead_unet(
    arch: MrPrismArch, common: dict[str, int], options: dict[str, Any], build_args: dict
) -> SegmentationModel:
    return MultiHeadUNet(
        common["in_channels"],
        common["num_classes"],
        common["num_raters"],
        arch,
        build_args=build_args,
    )


def _build_mrnet(
    arch: MrPrismArch, common: dict[str, int], options: dict[str, Any], build_args: dict
) -> SegmentationModel:
    return MRNet(
        common["in_channels"],
        common["num_classes"],
        common["num_raters"],
        common["image_size"],
        arch,
        build_args=build_args,
        **options,
    )


def _build_dpersona(
    arch: MrPrismArch, common: dict[str, int], options: dict[str, Any], build_args: dict
) -> SegmentationModel:
    return DPersona(
        common["in_channels"],
        common["num_classes"],
        common["num_raters"],
        arch,
        build_args=build_args,
        **options,
    )


def _build_diff(
    arch: MrPrismArch, common: dict[str, int], options: dict[str, Any], build_args: dict
) -> SegmentationModel:
    return DiFF(
        common["in_channels"], common["num_classes"], arch, build_args=build_args, **options
    )


_REGISTRY: dict[str, Callable[..., SegmentationModel]] = {
    "mrprism": _build_mrprism,
    "unet_mv": _build_unet_mv,
    "unet_staple": _build_unet_staple,
    "multihead_unet": _build_multihead_unet,
    "mrnet": _build_mrnet,
    "dpersona": _build_dpersona,
    "diff": _build_diff,
}
# each model's own (non-architecture) options; the rest go to the architecture preset
_MODEL_OPTIONS: dict[str, set[str]] = {
    "mrprism": _LOSS_OPTIONS | {"local_modules"},
    "mrnet": {"alpha"},
    "dpersona": {"latent_dim", "prior_samples", "bank_size", "alpha", "beta"},
    "diff": {"fusion_grid", "fusion_steps", "fusion_lr"},
}
#: options of every model: what stays at the site in federated training
_SPLIT_OPTIONS = {"local_modules", "local_norms"}
MODEL_NAMES = tuple(_REGISTRY)


def build_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    num_raters: int,
    image_size: int,
    preset: str = "tiny",
    **options: Any,
) -> SegmentationModel:
    """Build a segmentation model.

    Args:
        name: one of :data:`MODEL_NAMES`: ``mrprism``, ``unet_mv``, ``unet_staple``,
            ``multihead_unet``, ``mrnet``, ``dpersona``, ``diff``.
        in_channels: image channels C.
        num_classes: K.
        num_raters: M at this site.
        image_size: image side in pixels (a multiple of 32).
        preset: architecture preset, ``"tiny"`` or ``"paper"``.
        **options: architecture fields of :class:`MrPrismArch`, the model's own options
            (MrPrism: the fields of :class:`~mrprism_core.losses.MrPrismLossConfig`, e.g.
            ``zeta``, ``divp_supervision``, ``rater_mask_reliability_grad``; MRNet:
            ``alpha``; D-Persona: ``latent_dim``, ``prior_samples``, ``bank_size``, ``alpha``,
            ``beta``; DiFF: ``fusion_grid``, ``fusion_steps``, ``fusion_lr``) and
            the options every model takes: ``local_modules`` (dotted sub-module names kept
            at the site) and ``local_norms`` (also keep every normalisation layer there).

    Raises:
        ValueError: unknown name, preset or option, or an image size the network cannot take.
    """
    arch = check_model_options(name, preset, options)
    if image_size % 32:
        raise ValueError(
            f"image_size must be a multiple of 32 (5 down-samplings), got {image_size}"
        )
    for label, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if value < 1:
            raise ValueError(f"{label} must be >= 1, got {value}")
    if num_raters < 1:
        raise ValueError(f"num_raters must be >= 1, got {num_raters}")
    own = _MODEL_OPTIONS.get(name, set())
    local_modules = options.get("local_modules") if name != "mrprism" else None
    local_norms = bool(options.get("local_norms", False))
    common = {
        "in_channels": in_channels,
        "num_classes": num_classes,
        "num_raters": num_raters,
        "image_size": image_size,
    }
    build_args = {"name": name, "preset": preset, **common, **options}
    model_options = {k: v for k, v in options.items() if k in own}
    model = _REGISTRY[name](arch, common, model_options, build_args)
    if local_modules is not None:  # e.g. [] to aggregate everything (federated_shared)
        model.local_modules = tuple(local_modules)
    if local_norms:
        model.local_modules = tuple(model.local_modules) + norm_layer_names(
            model, model.local_modules
        )
    return model


#: Layers whose affine parameters ``local_norms`` keeps at the site.
_NORM_LAYERS = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm)


def norm_layer_names(model: nn.Module, skip: Sequence[str] = ()) -> tuple[str, ...]:
    """Dotted names of the model's normalisation layers outside the sub-modules ``skip``.

    Kept at the site (``local_norms``), they adapt the shared body to each hospital's image
    statistics while the rest is averaged: FedBN (Li et al., ICLR 2021), here for the
    GroupNorm/LayerNorm scales and shifts our models use.
    """
    inside = tuple(f"{name}." for name in skip)
    return tuple(
        name
        for name, module in model.named_modules()
        if isinstance(module, _NORM_LAYERS) and not f"{name}.".startswith(inside)
    )


def check_model_options(name: str, preset: str, options: Mapping[str, Any]) -> MrPrismArch:
    """The architecture ``name`` gets from ``preset`` and ``options``; raises before anything
    is built when a name is unknown, naming the model and every option it accepts.

    Callers that run several models (the simulation grid) check each one up front, so that
    an option one of them cannot take stops the run before the first method trains.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODEL_NAMES)}")
    own = _MODEL_OPTIONS.get(name, set())
    unknown = sorted(set(options) - own - _SPLIT_OPTIONS - _ARCH_FIELDS)
    if unknown:
        raise ValueError(
            f"model {name!r} has no option(s) {unknown}; its own: {sorted(own)}, "
            f"architecture: {sorted(_ARCH_FIELDS)}, and {sorted(_SPLIT_OPTIONS)}"
        )
    return get_preset(preset, **{k: v for k, v in options.items() if k in _ARCH_FIELDS})


def build_model_for_data(spec: Mapping[str, Any], info: Any) -> SegmentationModel:
    """Build the model a spec describes for a data set's channels, classes, raters and size.

    Args:
        spec: ``{"name", "preset", "in_channels", "num_classes", "options"}``; in federated
            runs it comes from the server, so every site builds the same architecture.
        info: a :class:`~mrprism_core.data.factory.DatasetInfo` of the data to train on.

    Raises:
        ValueError: the data does not fit the spec (channels or classes differ).
    """
    for key in ("in_channels", "num_classes"):
        have = getattr(info, key)
        if int(spec[key]) != have:
            raise ValueError(
                f"this site's data has {key}={have} but the federation trains a model with "
                f"{key}={spec[key]}; fix the site's data config or the run config"
            )
    return build_model(
        str(spec["name"]),
        in_channels=info.in_channels,
        num_classes=info.num_classes,
        num_raters=info.num_raters,
        image_size=info.image_size,
        preset=str(spec["preset"]),
        **dict(spec.get("options") or {}),
    )


def spec_from_build_args(build_args: Mapping[str, Any]) -> dict[str, Any]:
    """The data-independent spec (:func:`build_model_for_data`) a model was built from."""
    data_keys = {"name", "preset", "in_channels", "num_classes", "num_raters", "image_size"}
    return {
        "name": build_args["name"],
        "preset": build_args["preset"],
        "in_channels": int(build_args["in_channels"]),
        "num_classes": int(build_args["num_classes"]),
        "options": {k: v for k, v in build_args.items() if k not in data_keys},
    }


def model_from_build_args(build_args: dict[str, Any]) -> SegmentationModel:
    """Rebuild a model from the ``build_args`` stored with it (e.g. in a checkpoint)."""
    args = dict(build_args)
    return build_model(args.pop("name"), **args)


def _module_prefixes(model: nn.Module, names: Sequence[str]) -> tuple[str, ...]:
    available = dict(model.named_modules())
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(
            f"local module(s) {missing} not found in {type(model).__name__}; "
            f"top-level modules are {[n for n, _ in model.named_children()]}"
        )
    return tuple(f"{n}." for n in names)


def split_state(
    model: nn.Module, local_modules: Sequence[str] | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a model's state dict into shared and site-local parts, by sub-module.

    Args:
        model: a model built by :func:`build_model`.
        local_modules: dotted sub-module names to keep local; defaults to the model's own
            ``local_modules`` (MrPrism: the rater identities and DivP's rater heads).

    Returns:
        ``(shared, local)``: two disjoint dicts of name -> tensor that together hold the whole
        state dict. Shared tensors have the same keys and shapes at every site.
    """
    names = getattr(model, "local_modules", ()) if local_modules is None else local_modules
    prefixes = _module_prefixes(model, names)
    shared: dict[str, Tensor] = {}
    local: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        (local if key.startswith(prefixes) else shared)[key] = value
    return shared, local
