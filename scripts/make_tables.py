"""Regenerate memkernels/activations/tables.json: the few-bit derivative tables shipped with the package.

    python scripts/make_tables.py

Fits every activation except ReLU, LeakyReLU and Hardsigmoid (exact in 1 bit, built on the fly) at
torch's default parameters for bits 1, 2, 3, 4, 8, writes the file (deterministic: same code, same
bytes) and prints the integrated error E_{x ~ N(0,1)} (f'(x) - levels[code(x)])**2 of every table.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the package of this checkout, installed or not

from memkernels import reference  # noqa: E402
from memkernels.activations import tables  # noqa: E402
from memkernels.activations.spec import TWO_VALUED, VALID_BITS, Activation, default_params  # noqa: E402

OUTPUT = REPO / "memkernels" / "activations" / "tables.json"


def fitted_activations() -> list[Activation]:
    return [act for act in Activation if act not in TWO_VALUED]


def build() -> tuple[dict, dict[tuple[str, int], float]]:
    """The json document and the integrated error of every table."""
    errors = {}
    activations = {}
    for act in fitted_activations():
        p0, p1 = default_params(act)
        entries = {}
        for bits in VALID_BITS:
            table = tables.fit_activation_table(act, bits, p0, p1)
            error = tables.integrated_error(
                table, lambda x, act=act, p0=p0, p1=p1: reference.activation_derivative(x, act, p0, p1))
            errors[act.name, bits] = error
            entries[str(bits)] = {
                "borders": table.borders.tolist(),
                "levels": table.levels.tolist(),
                "value_levels": table.value_levels.tolist(),
                "error": error,
            }
        activations[act.name] = {"id": int(act), "params": [p0, p1], "tables": entries}
    metadata = {
        "generator": "scripts/make_tables.py",
        "density": tables.DENSITY,
        "grid": {"limit": tables.GRID_LIMIT, "cells": tables.GRID_CELLS,
                 "quadrature": "3-point Gauss-Legendre per cell"},
        "code": "code(x) = #{borders < x}; backward multiplies by levels[code]",
        "error": "E_{x ~ N(0,1)} (f'(x) - levels[code(x)])**2",
    }
    return {"metadata": metadata, "activations": activations}, errors


def dumps(document: dict) -> str:
    """Indented json with every list of numbers on one line."""
    text = json.dumps(document, indent=1)
    return re.sub(r"\[([^\[\]{}]*)\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def main() -> None:
    document, errors = build()
    OUTPUT.write_text(dumps(document))
    print(f"wrote {OUTPUT.relative_to(REPO)}")
    print(f"{'activation':<12}" + "".join(f"{f'{bits} bits':>12}" for bits in VALID_BITS))
    for act in fitted_activations():
        print(f"{act.name:<12}" + "".join(f"{errors[act.name, bits]:>12.4e}" for bits in VALID_BITS))


if __name__ == "__main__":
    main()
