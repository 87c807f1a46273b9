"""How much of a known smooth deformation the network recovers, and how precisely (issue 15's diagnosis).

Pairs: a brain against itself warped by a random smooth displacement of at most ``--mm`` mm (control scale
40 mm; the validation suite's "deformed" generator, seeds ``900 + 10 i + k``), so the true flow is known
everywhere. Brains: ``--brains`` held-out synthetic brains (the moving images and labels of
``brainsynth.heldout_pairs(paired=True, contrast="same")``, never drawn by training) on the model's 2 mm grid,
and, unless ``--no-real``, the validation suite's real brains on their native grids. No affine (the two images
share one space), so the flow compared is the registration's own (``Result.voxel_flow``, fixed-grid voxels).

Per model × mode (``network`` alone, ``passes2``: two network passes, ``defaults``: network + the default
refinement) × pair, inside the moving brain (intensity > 2 % of its maximum):

* ``slope``: least-squares slope of the flow on the true displacement (1 = the whole displacement, 0 = none);
* ``epe_mm``: mean endpoint error (mm); ``true_mm``: mean true displacement (mm);
* ``dice``: labels (synthetic: mean over labels; real: GM/WM) against the warped fixed labels;
* ``identity_mm`` (network alone): mean displacement on the pair (x, x), where the answer is 0.

Loss profile (no model): the training loss of the packaged model's campaign (local NCC + λ · diffusion +
soft Dice on the labels; window, σ and weights from the packaged checkpoint's training config) at
``α`` × the true flow of each pair, α in ``LOSS_SCALES``: whether the loss itself prefers the whole
displacement (minimum at α = 1) or an undershoot (a network trained on it would then learn to undershoot).

    python benchmarks/network_precision.py [--models NAME=CKPT,...] [--brains 2] [--mm 8,12] [--no-real]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
import validation_suite as VS

NAME = "network_precision"
SCALE_MM = 40.0
SEED0 = 900
MODES = ("network", "passes2", "defaults")
LOSS_SCALES = (0.0, 0.5, 0.75, 0.9, 1.0, 1.1)
MODE_KW: dict[str, dict[str, Any]] = {
    "network": {"refine": 0},
    "passes2": {"refine": 0, "passes": 2},
    "defaults": {},
}


def brains(args: Any) -> list[dict[str, Any]]:
    """``{"name", "image" (3D float32), "labels" (3D int), "affine" (4x4), "tissue"}`` per brain."""
    import nibabel as nib
    import numpy as np

    from emorph_deploy.data.brainsynth import heldout_pairs

    out = []
    items = heldout_pairs(n=args.brains, shape=C.DEFAULT_GRID, spacing_mm=2.0, contrast="same", paired=True)
    for i, it in enumerate(items):
        image = np.asarray(it["moving"], np.float32).reshape(np.shape(it["moving"])[-3:])
        labels = np.asarray(it["moving_labels"]).reshape(image.shape).astype(np.int16)
        out.append(
            {
                "name": f"synthetic-{i} ({it.get('contrast', '?')})",
                "image": image,
                "labels": labels,
                "affine": np.diag([2.0, 2.0, 2.0, 1.0]),
                "tissue": False,
            }
        )
    if not args.no_real:
        for x in VS.load_real_suite(args).subjects:
            img, lab = nib.load(str(x.paths["image"])), nib.load(str(x.paths["labels"]))
            out.append(
                {
                    "name": x.name,
                    "image": np.asanyarray(img.dataobj).astype(np.float32),
                    "labels": np.asanyarray(lab.dataobj).astype(np.int16),
                    "affine": np.asarray(img.affine, dtype=np.float64),
                    "tissue": True,
                }
            )
    return out


def flow_figures(true: Any, flow: Any, inside: Any, voxel_mm: Any) -> dict[str, float]:
    """Slope, endpoint error and true magnitude of ``flow`` against ``true`` (both (3, X, Y, Z) voxels of
    sizes ``voxel_mm`` (3,)) at the voxels ``inside``."""
    import numpy as np

    t = true[:, inside].astype(np.float64)
    f = flow[:, inside].astype(np.float64)
    mm = np.asarray(voxel_mm, dtype=np.float64)[:, None]
    return {
        "slope": float((t * f).sum() / max((t * t).sum(), 1e-12)),
        "epe_mm": float(np.sqrt((((f - t) * mm) ** 2).sum(0)).mean()),
        "true_mm": float(np.sqrt(((t * mm) ** 2).sum(0)).mean()),
    }


def model_flow(result: Any) -> Any:
    """(3, X, Y, Z) displacement in the fixed grid's voxels from a registration result."""
    import numpy as np

    u = np.asarray(result.voxel_flow().dataobj, dtype=np.float32)
    return np.moveaxis(u.reshape(*u.shape[:3], 3), -1, 0)


def known_deformation(brain: dict[str, Any], mm: float, seed: int) -> dict[str, Any]:
    """``brain`` under the random smooth displacement of seed ``seed`` and largest displacement ``mm``:
    ``{"brain", "mm", "phi" (3, X, Y, Z) voxels, "fixed" image, "fixed_labels", "voxel_mm" (3,)}`` with
    fixed(x) = moving(x + phi(x))."""
    import numpy as np

    from emorph_deploy.data.synthetic import random_displacement, warp_numpy

    image, labels, aff = brain["image"], brain["labels"], brain["affine"]
    voxel_mm = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    phi = random_displacement(
        image.shape, seed, max_disp=mm / float(voxel_mm.mean()), scale=SCALE_MM / float(voxel_mm.mean())
    )
    return {
        "brain": brain,
        "mm": mm,
        "phi": phi,
        "fixed": warp_numpy(image, phi, order=1),
        "fixed_labels": warp_numpy(labels.astype(np.float32), phi, order=0).astype(np.int16),
        "voxel_mm": voxel_mm,
    }


def training_loss_config() -> Any:
    """The packaged model's training config (``TrainConfig``): its loss window, σ and weights."""
    from emorph_deploy.train.checkpoint import load_checkpoint_meta
    from emorph_deploy.train.config import TrainConfig
    from emorph_deploy.weights import default_checkpoint_path

    meta, _ = load_checkpoint_meta(default_checkpoint_path())
    return TrainConfig.from_dict(meta.get("training", {}).get("config", {}))


def loss_profile(case: dict[str, Any], cfg: Any) -> list[dict]:
    """The training loss (the terms of ``cfg``, a ``TrainConfig``) of one known deformation at α × its true
    flow, α in LOSS_SCALES."""
    import numpy as np
    import torch

    from emorph_deploy.losses import DiffusionLoss, NCCLoss, SoftDiceLoss, one_hot
    from emorph_deploy.models.warp import warp

    ncc_loss = NCCLoss(window=cfg.ncc_window, sigma=cfg.ncc_sigma, kind="gaussian")
    reg_loss, dice_loss = DiffusionLoss(), SoftDiceLoss()
    brain = case["brain"]
    moving = torch.from_numpy(np.ascontiguousarray(brain["image"], np.float32))[None, None]
    fixed = torch.from_numpy(np.ascontiguousarray(case["fixed"], np.float32))[None, None]
    lab_m = torch.from_numpy(brain["labels"].astype(np.int64))[None, None]
    lab_f = torch.from_numpy(case["fixed_labels"].astype(np.int64))[None, None]
    values = torch.arange(int(max(lab_m.max(), lab_f.max())) + 1)
    oh_m, oh_f = one_hot(lab_m, values), one_hot(lab_f, values)
    true = torch.from_numpy(np.asarray(case["phi"], np.float32))[None]
    rows = []
    for alpha in LOSS_SCALES:
        u = alpha * true
        with torch.no_grad():
            ncc = float(ncc_loss(warp(moving, u), fixed))
            reg = float(reg_loss(u))
            dice = float(dice_loss(warp(oh_m, u), oh_f))
        total = cfg.ncc_weight * ncc + cfg.reg_weight * reg + cfg.dice_weight * dice
        rows.append(
            {
                "pair": f"{brain['name']} deformed {case['mm']:g} mm",
                "alpha": alpha,
                "ncc": ncc,
                "reg": reg,
                "dice": dice,
                "loss": total,
            }
        )
    return rows


def measure(reg: Any, case: dict[str, Any], modes: tuple[str, ...], identity: bool) -> list[dict]:
    """Rows of one known deformation (:func:`known_deformation`), per mode; ``identity``: also the network's
    flow on the brain against itself (``identity_mm`` of the network row)."""
    import nibabel as nib
    import numpy as np

    brain, fixed_labels, voxel_mm = case["brain"], case["fixed_labels"], case["voxel_mm"]
    image, labels, aff = brain["image"], brain["labels"], brain["affine"]
    fixed = nib.Nifti1Image(case["fixed"], aff)
    moving = nib.Nifti1Image(image, aff)
    moving_labels = nib.Nifti1Image(labels, aff)
    inside = image > 0.02 * float(image.max())
    pair = {
        "pair": f"{brain['name']} deformed {case['mm']:g} mm",
        "brain": brain["name"],
        "real": brain["tissue"],
        "max_mm": case["mm"],
        "dice_none": VS.score(labels, fixed_labels, tissue=brain["tissue"])["dice"],
    }
    rows = []
    for mode in modes:
        r = reg.register(fixed, moving, labels=moving_labels, affine=False, **MODE_KW[mode])
        warped = np.asarray(r.warped_labels.dataobj)
        row = {
            **pair,
            "mode": mode,
            **flow_figures(case["phi"], model_flow(r), inside, voxel_mm),
            "dice": VS.score(warped, fixed_labels, tissue=brain["tissue"])["dice"],
        }
        if mode == "network" and identity:
            same = reg.register(moving, moving, affine=False, refine=0)
            u = model_flow(same) * voxel_mm[:, None, None, None]
            row["identity_mm"] = float(np.sqrt((u[:, inside] ** 2).sum(0)).mean())
        rows.append(row)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean figures per model × mode × kind (synthetic / real)."""
    import numpy as np

    out = []
    keys = sorted(
        {(r["model"], r["mode"], r["real"]) for r in rows}, key=lambda k: (k[0], MODES.index(k[1]), k[2])
    )
    for model, mode, real in keys:
        sel = [r for r in rows if (r["model"], r["mode"], r["real"]) == (model, mode, real)]
        entry = {"model": model, "mode": mode, "kind": "real" if real else "synthetic", "pairs": len(sel)}
        for k in ("slope", "epe_mm", "true_mm", "dice", "dice_none", "identity_mm"):
            vals = [r[k] for r in sel if k in r]
            entry[k] = float(np.mean(vals)) if vals else None
        out.append(entry)
    return out


#: (header, key, format) of the two tables' columns
MEAN_COLUMNS = (
    ("model", "model", None),
    ("mode", "mode", None),
    ("brains", "kind", None),
    ("pairs", "pairs", None),
    ("slope", "slope", ".2f"),
    ("EPE (mm)", "epe_mm", ".2f"),
    ("true (mm)", "true_mm", ".2f"),
    ("Dice", "dice", ".3f"),
    ("Dice none", "dice_none", ".3f"),
    ("identity (mm)", "identity_mm", ".2f"),
)
PAIR_COLUMNS = (
    MEAN_COLUMNS[0],
    ("pair", "pair", None),
    *(c for c in MEAN_COLUMNS if c[1] in ("mode", "slope", "epe_mm", "dice")),
)


LOSS_COLUMNS = (
    ("α", "alpha", ".2f"),
    ("pairs", "pairs", None),
    ("NCC", "ncc", ".4f"),
    ("diffusion", "reg", ".4f"),
    ("Dice loss", "dice", ".4f"),
    ("loss", "loss", ".4f"),
)


def summarise_loss(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-α means of the loss profile rows."""
    import numpy as np

    out = []
    for alpha in LOSS_SCALES:
        sel = [r for r in rows if r["alpha"] == alpha]
        entry = {"alpha": alpha, "pairs": len(sel)}
        entry.update({k: float(np.mean([r[k] for r in sel])) for k in ("ncc", "reg", "dice", "loss")})
        out.append(entry)
    return out


def _table(columns: tuple[tuple[str, str, str | None], ...], entries: list[dict[str, Any]]) -> str:
    cells = [[e.get(k) if spec is None else C.fmt(e.get(k), spec) for _, k, spec in columns] for e in entries]
    return C.md_table([h for h, _, _ in columns], cells)


def markdown(res: dict[str, Any]) -> str:
    table = _table(MEAN_COLUMNS, res["summary"]["means"])
    per_pair = _table(PAIR_COLUMNS, res["rows"])
    body = (
        "## Means per model, mode and kind of brain\n\n"
        + table
        + "\n\nslope: least-squares slope of the flow on the true displacement inside the brain (1 = all of "
        "it); EPE: mean endpoint error; identity: mean displacement on (x, x), where the answer is 0.\n\n"
        "## Per pair\n\n" + per_pair
    )
    if res["summary"].get("loss_profile"):
        body += (
            "\n\n## Training loss at a scaled true flow\n\n"
            + _table(LOSS_COLUMNS, res["summary"]["loss_profile"])
            + "\n\nloss = NCC + λ · diffusion + Dice at α × the true flow, with the packaged model's "
            "training settings ("
            + res["summary"]["loss_settings"]
            + "); the per-α means over the pairs above, whose minimum says which share of the displacement "
            "the training loss rewards."
        )
    return C.markdown_document(res, "Network precision on known deformations", body)


def main(argv: list[str] | None = None) -> int:
    ap = C.base_parser(__doc__.split("\n\n")[0])
    ap.add_argument(
        "--models", default=None, help="comma list of checkpoints, PATH or NAME=PATH (default packaged)"
    )
    ap.add_argument(
        "--brains", type=int, default=None, help="held-out synthetic brains (default 2; --quick 1)"
    )
    ap.add_argument(
        "--mm", default=None, help="comma list of largest displacements, mm (default 8,12; --quick 8)"
    )
    ap.add_argument("--no-real", action="store_true", help="synthetic brains only (no realbrains suite)")
    ap.add_argument("--backend", default="torch", help="Registrar backend (auto|torch|onnxruntime|openvino)")
    args = ap.parse_args(argv)
    args.brains = (1 if args.quick else 2) if args.brains is None else args.brains
    try:
        mms = [float(v) for v in (args.mm or ("8" if args.quick else "8,12")).split(",")]
    except ValueError:
        raise SystemExit(f"--mm: expected a comma list of numbers, got {args.mm!r}") from None
    if args.brains < 0 or not mms or any(not 0 < v < 100 for v in mms):
        raise SystemExit(f"--brains: expected >= 0 and --mm values in (0, 100), got {args.brains}, {mms}")
    args.no_real = args.no_real or args.quick
    args.subjects = None  # all of the realbrains suite (validation_suite.load_real_suite reads it)
    args.runs = args.runs or 1
    args = C.finish_args(args, NAME)
    C.check_outputs_writable(args.out, args.force)
    modes = ("network", "defaults") if args.quick else MODES

    import torch

    from emorph_deploy.registration import Registrar

    torch.set_num_threads(args.threads)
    res = C.new_result(NAME, args, argv)
    models: dict[str, str | None] = {"packaged": None}
    if args.models:
        models = {}
        for item in args.models.split(","):
            name, eq, path = item.strip().partition("=")
            models[name if eq else Path(name).stem] = path if eq else name
    pairs = brains(args)
    if not pairs:
        raise SystemExit("no brains: pass --brains N > 0 or drop --no-real")
    # each deformation drawn once; the loss profile and every model see the same pairs
    cases = [  # "first": the brain's first deformation, where the network also meets (x, x)
        {**known_deformation(brain, mm, SEED0 + 10 * i + k), "first": k == 0}
        for i, brain in enumerate(pairs)
        for k, mm in enumerate(mms)
    ]
    cfg = training_loss_config()
    loss_rows = [row for case in cases for row in loss_profile(case, cfg)]
    res["summary"]["loss_profile"] = summarise_loss(loss_rows)
    res["summary"]["loss_settings"] = (
        f"NCC window {cfg.ncc_window}, σ {cfg.ncc_sigma}; weights NCC {cfg.ncc_weight}, "
        f"diffusion {cfg.reg_weight}, Dice {cfg.dice_weight}"
    )
    res["loss_rows"] = loss_rows
    for name, path in models.items():
        reg = Registrar.load(path, backend=args.backend)
        for case in cases:
            C.log(f"{name}: {case['brain']['name']} deformed {case['mm']:g} mm")
            for row in measure(reg, case, modes, identity=case["first"]):
                res["rows"].append({"model": name, **row})
    res["summary"]["means"] = summarise(res["rows"])
    res["summary"]["deformation"] = {
        "max_mm": mms,
        "scale_mm": SCALE_MM,
        "seeds": f"{SEED0} + 10 · brain + k",
    }
    res["notes"].append(
        "The fixed image is the moving one warped (trilinear), so the answer is known: a network that "
        "recovers only part of it (slope < 1) or moves identical images (identity > 0) is imprecise at the "
        "voxel scale, whatever its Dice on inter-subject pairs."
    )
    C.publish(res, markdown, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
