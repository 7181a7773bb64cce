"""Write the demo card's ``domain`` section (`AttentionMapLib.core.domain`): what its training scans and crops hold.

    .venv/bin/python -m tools.fit_domain [--card AttentionMap/AttentionMapLib/demo_model/demo_lung_nodule_vit.json]
                                          [--crops 3000] [--print-only]

- ``min_lung_fraction``: the least fraction of lung (`region.find_lungs` on the training CT) in any of ``--crops``
  nodule crops drawn as training draws them (`demo_data.CropSampler` "train", a quarter of the nodules on the lung's
  rim as in the recipe's ``--wall-fraction 0.25``; seed 0), rounded down to a whole percent.
- ``training``: the lung volumes of lung1 and lung2 (`find_lungs` on the RAS 2 mm grid), the fields of view of the
  scans as shipped and of their training re-griddings (`demo_data.load_regridded_cts(cts, 3, seed 1)`, as in the
  recipe's ``--regridded-scans 3``), and the 1st / 99th percentiles of the shipped scans' voxels (HU).

The weights play no part: rerun after a new training data recipe, not after a new training run. The card is
rewritten in place, every other field and the key order kept (a new key is appended). About a minute.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from attentionmap_dev import demo_data
from tools.evaluate_demo_model import CARD_NAME, MODELS_DIR

CARD = MODELS_DIR / CARD_NAME
WALL_FRACTION = 0.25
REGRIDDED_PER_SCAN, REGRID_SEED = 3, 1


def domain_section(crops: int) -> Dict[str, Any]:
    """The ``domain`` section from the training scans (see the module docstring)."""
    from AttentionMapLib.core.domain import field_of_view_mm
    from AttentionMapLib.core.region import find_lungs
    from AttentionMapLib.io import read_volume
    from AttentionMapLib.sample_data import fetch_sample_data

    paths = fetch_sample_data()
    cts = demo_data.load_demo_cts(paths)
    lungs = {ct.name: find_lungs(ct.hu, [2.0, 2.0, 2.0]) for ct in cts}
    sampler = demo_data.CropSampler(cts, "train")
    rng = np.random.default_rng(0)
    fractions = []
    for _ in range(crops):
        origin, name = sampler.sample_pair(rng, wall_fraction=WALL_FRACTION)[3:5]
        fractions.append(float(lungs[name][tuple(slice(o, o + demo_data.CROP) for o in origin)].mean()))
    fovs: List[np.ndarray] = []
    values = []
    for ct in cts:
        array, ijk_to_ras = read_volume(paths[f"{ct.name}_image"])
        fovs.append(field_of_view_mm(array.shape, ijk_to_ras))
        values.append(array.ravel())
    for ct in demo_data.load_regridded_cts(cts, REGRIDDED_PER_SCAN, REGRID_SEED, paths):
        fovs.append(field_of_view_mm(ct.hu.shape, ct.ijk_to_ras))
    fov = np.array(fovs)
    p1, p99 = np.percentile(np.concatenate(values), (1.0, 99.0))
    volumes = [float(m.sum() * 8e-3) for m in lungs.values()]
    return {
        "kind": "lung_content",
        "min_lung_fraction": math.floor(min(fractions) * 100) / 100,
        "hu_threshold": -400.0,
        "training": {
            "lung_volume_ml": [round(min(volumes)), round(max(volumes))],
            "field_of_view_mm": [[round(float(lo)), round(float(hi))] for lo, hi in zip(fov.min(0), fov.max(0))],
            "intensity_hu_p1_p99": [round(float(p1)), round(float(p99))],
        },
        "fitted_on": (f"{crops} training nodule crops (tools/fit_domain.py, seed 0; least lung fraction "
                      f"{min(fractions):.3f}, 1st percentile {np.percentile(fractions, 1):.3f}); lung volumes of "
                      f"lung1 and lung2; fields of view of the scans as shipped and of their "
                      f"{REGRIDDED_PER_SCAN * len(cts)} training re-griddings; intensities of the shipped scans"),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", type=Path, default=CARD)
    parser.add_argument("--crops", type=int, default=3000)
    parser.add_argument("--print-only", action="store_true", help="print the section, do not write the card")
    args = parser.parse_args(argv)
    section = domain_section(args.crops)
    print(json.dumps(section, indent=2))
    if not args.print_only:
        card = json.loads(args.card.read_text())
        card["domain"] = section
        args.card.write_text(json.dumps(card, indent=2) + "\n")
        print(f"wrote the domain section of {args.card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
