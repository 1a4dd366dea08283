"""MX element and block formats as plain data (OCP Microscaling Formats v1.0, NVIDIA's NVFP4).

One row per element format, defined by its bit layout, with every limit derived from it; one row per
block format (element, default block size, how the scale is stored). Pure Python: the config reads
the names without importing torch, and `latmix.mx` (the quantizer) and `latmix.bound` consume the
numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ELEMENT_FORMATS", "FORMATS", "ElementFormat", "MXFormat", "get_format"]


@dataclass(frozen=True)
class ElementFormat:
    """An MX element format, defined by its bit layout; every limit is derived from it.

    `mbits` counts fraction bits: the bits below the binary point of a normal significand (1.f for
    floats; for int8 the bits below the integer bit of the fixed-point value i.ffffff).
    `specials` says which top-exponent codes are reserved: "none" (FP6, FP4, INT8), "nan" (OCP FP8
    E4M3: only S.1111.111 is NaN), "inf_nan" (FP8 E5M2: the whole top exponent, as in IEEE 754).
    """

    name: str
    ebits: int
    mbits: int
    is_int: bool = False
    specials: Literal["none", "nan", "inf_nan"] = "none"

    @property
    def bits(self) -> int:
        integer_bit = 1 if self.is_int else 0
        return 1 + self.ebits + integer_bit + self.mbits

    @property
    def bias(self) -> int:
        return 0 if self.is_int else 2 ** (self.ebits - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade (int8 has a single binade, exponent 0)."""
        return 0 if self.is_int else 1 - self.bias

    @property
    def emax(self) -> int:
        if self.is_int:
            return 0
        top_exponent = 2**self.ebits - 1 - self.bias
        return top_exponent - 1 if self.specials == "inf_nan" else top_exponent

    @property
    def max_normal(self) -> float:
        # E4M3 gives up its top significand (S.1111.111 = NaN), the others keep all of them.
        reserved_codes = 1 if self.specials == "nan" else 0
        return 2.0**self.emax * (2.0 - (1 + reserved_codes) * 2.0**-self.mbits)

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mbits)

    @property
    def bound_constant(self) -> float:
        """c_fmt of DESIGN.md: worst |Q(y) - y| relative to the block's power-of-two scale.

        The larger of half a step in the top binade and the saturation gap below 2^(emax+1).
        """
        return max(2.0 ** -(self.mbits + 1), 2.0 - self.max_normal / 2.0**self.emax)


ELEMENT_FORMATS: dict[str, ElementFormat] = {
    element.name: element
    for element in (
        ElementFormat("fp8_e4m3", ebits=4, mbits=3, specials="nan"),
        ElementFormat("fp8_e5m2", ebits=5, mbits=2, specials="inf_nan"),
        ElementFormat("fp6_e3m2", ebits=3, mbits=2),
        ElementFormat("fp6_e2m3", ebits=2, mbits=3),
        ElementFormat("fp4_e2m1", ebits=2, mbits=1),
        ElementFormat("int8", ebits=0, mbits=6, is_int=True),
    )
}


@dataclass(frozen=True)
class MXFormat:
    """A block-scaled format: element format, block size, and how the block scale is stored."""

    name: str
    element: ElementFormat
    default_block_size: int = 32
    scale: Literal["e8m0", "e4m3"] = "e8m0"
    tensor_scale: bool = False

    def __post_init__(self) -> None:
        if (self.scale == "e4m3") != self.tensor_scale:
            raise ValueError(
                f"format {self.name!r}: an E4M3 block scale needs the FP32 tensor scale (as nvfp4) and an "
                "E8M0 scale has none; set scale and tensor_scale together"
            )


_CANONICAL_FORMATS = [MXFormat(f"mx{element.name}", element) for element in ELEMENT_FORMATS.values()]
_ALIASES = {"mxfp8": "mxfp8_e4m3", "mxfp6": "mxfp6_e2m3", "mxfp4": "mxfp4_e2m1"}
_NVFP4 = MXFormat(
    "nvfp4", ELEMENT_FORMATS["fp4_e2m1"], default_block_size=16, scale="e4m3", tensor_scale=True
)

FORMATS: dict[str, MXFormat] = {fmt.name: fmt for fmt in (*_CANONICAL_FORMATS, _NVFP4)}
FORMATS.update({alias: FORMATS[target] for alias, target in _ALIASES.items()})


def get_format(name: str | MXFormat) -> MXFormat:
    """The MXFormat called `name` (an MXFormat passes through), or a ValueError listing the choices."""
    if isinstance(name, MXFormat):
        return name
    if name not in FORMATS:
        raise ValueError(f"unknown MX format {name!r}; choose one of: {', '.join(FORMATS)}")
    return FORMATS[name]
