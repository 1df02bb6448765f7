"""Run synthetic cases through a bundle's predictor and keep what the motion study needs.

Per seed: ``<seed>.npz`` (normalised phases, foreground probability, labelmap, true mask; in the predictor's slice
order) and ``<seed>.json`` (the generator's lesion records). Two workers, one CPU thread each (about 5 s a case).
Run from the repository root (``PYTHONPATH=UMLCore:training`` or the project's .venv):

    python docs/model-eval/motion/mine.py 1000000 1000060 runs/fnprobe [MODEL]

The study ran it twice: once with the generator as it was (the mask with the pre-contrast phase; commit fc1ed20)
into runs/fnprobe, once after the fix (commit 9b58893) into runs/fnprobe2; then compare.py.
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "training"))
import train_refiner  # noqa: E402
from workers import ordered_map  # noqa: E402

from umlcore.synthetic import generate_case  # noqa: E402


def job(args):
    seed, out, model = args
    a = train_refiner.predicted_slices(seed, model)
    case = generate_case(seed, shape=train_refiner.SHAPE, label_noise=train_refiner.LABEL_NOISE)
    np.savez_compressed(Path(out) / f"{seed}.npz", stack=a["stack"].astype(np.float16),
                        fg=a["fg"].astype(np.float16), labels=a["labels"], truth=a["truth"])
    (Path(out) / f"{seed}.json").write_text(json.dumps({"lesions": case.lesions}, default=str))
    return seed


def main() -> None:
    first, stop, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    model = sys.argv[4] if len(sys.argv) > 4 else "Resources/Models/uml-breast-dce-small"
    out.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(ordered_map(job, [(s, str(out), model) for s in range(first, stop)], 2)):
        print(i, seed, flush=True)


if __name__ == "__main__":
    main()
