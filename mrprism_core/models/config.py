"""Architecture presets. ``paper`` follows paper 000 (Section 3.1.1); ``tiny`` is for tests and
CPU demos. A preset is a frozen dataclass; ``build_model(..., **overrides)`` replaces fields."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

__all__ = ["MrPrismArch", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class MrPrismArch:
    """Sizes of the MrPrism network. Sequences over ConP stages run from deep to shallow."""

    stem_width: int = 64  # channels of the stride-2 stem
    encoder_widths: tuple[int, ...] = (64, 128, 256, 512)  # channels of the 4 residual stages
    encoder_depths: tuple[int, ...] = (3, 4, 6, 3)  # residual blocks per stage (ResNet-34)
    conp_widths: tuple[int, ...] = (256, 128, 64, 32, 16)  # channels after each ConP deconv
    # channels of a full-resolution image branch (one 3x3 conv) that the decoder's last stage
    # reads: our option, 0 = off (the paper's decoder ends on a 2x deconvolution of the
    # stem's half-resolution map); any decoder on this encoder uses it (README)
    full_resolution_width: int = 0
    conp_patch_sizes: tuple[int, ...] = (2, 4, 4, 8, 8)  # attention patch per ConP stage
    conp_dim: int = 128  # token dimension of ConP attention
    conp_heads: int = 4  # attention heads per ConP stage
    conp_confidence_head: bool = True  # ConP's output layer also sees the confidence embedding
    # ConP reads log s, log(1-s), log q, log(1-q) per rater (the whole table of w = log P(z|y));
    # False: log s and log q only, with which ConP ignored the confidences (README)
    conp_whole_likelihood: bool = True
    confidence_width: int = 16  # channels of the rater-confidence embedding
    divp_patch_size: int = 8  # patch size of DivP's self-attention
    divp_dim: int = 128  # token dimension of DivP
    divp_heads: tuple[int, ...] = (4, 4, 4)  # heads of the shared DivP blocks (last block: M)
    rater_head_dim: int = 32  # per-rater attention head width in DivP's last block
    # DivP's rater heads also read ConP's last decoder map, pixel by pixel (our option, README)
    divp_pixel_context: bool = False
    mlp_ratio: int = 2  # hidden size of every MLP, as a multiple of the token dimension
    recurrences: int = 3  # tau: ConP/DivP recurrences in training (inference adds one ConP)
    lr: float = 1e-4  # Adam learning rate used by the trainers unless overridden

    def __post_init__(self) -> None:
        if len(self.conp_widths) != 5 or len(self.conp_patch_sizes) != 5:
            raise ValueError("ConP has 5 stages: conp_widths and conp_patch_sizes need 5 values")
        if self.recurrences < 1:
            raise ValueError(f"recurrences must be >= 1, got {self.recurrences}")
        if self.full_resolution_width < 0:
            raise ValueError(
                f"full_resolution_width must be >= 0, got {self.full_resolution_width}"
            )


PRESETS: dict[str, MrPrismArch] = {
    # 256 px; DivP heads 4, 4, 4 and M; Adam 1e-4, zeta 0.3, tau 3 (paper 000, Section 3.1.1).
    # The paper's patch sizes (ConP 8, 7, 7, 7, 7 from the full-resolution end, DivP 7) do not
    # divide the 8-128 px ConP maps or the 256 px DivP input (8 -> 14 px is 67 % padding, and
    # the deepest stage's 6.7 M parameters attended over 4 tokens): we keep 8 at the
    # full-resolution end and use 2, 4, 4, 8 deeper (16, 16, 64, 64, 256 tokens) and 8 in DivP.
    "paper": MrPrismArch(),
    # 32-64 px, a few thousand parameters per stage: tests and CPU demos.
    "tiny": MrPrismArch(
        stem_width=8,
        encoder_widths=(8, 16, 32, 64),
        encoder_depths=(1, 1, 1, 1),
        conp_widths=(32, 16, 16, 8, 8),
        conp_patch_sizes=(1, 1, 2, 2, 4),
        conp_dim=32,
        conp_heads=2,
        confidence_width=8,
        divp_patch_size=4,
        divp_dim=32,
        divp_heads=(2, 2, 2),
        rater_head_dim=16,
        mlp_ratio=2,
        recurrences=3,
        # measured (README, "Choosing the defaults"): at 1e-3 every tiny model was still far
        # from converged after the default experiment's 20-30 passes
        lr=1e-2,
    ),
}


def get_preset(name: str, **overrides: object) -> MrPrismArch:
    """The named preset with ``overrides`` applied (unknown names raise with the valid ones)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    valid = {f.name for f in fields(MrPrismArch)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown architecture option(s) {unknown}; valid: {sorted(valid)}")
    cleaned = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return replace(PRESETS[name], **cleaned)
