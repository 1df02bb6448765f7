"""Single-volume test figures of a kept calibration against the refitted one, on calibrate_single_volume.py's rows.

    python docs/model-eval/v1130-finetune/kept_vs_refit.py REPORT.json KEPT_BUNDLE

REPORT.json: ``calibrate_single_volume.py``'s report (raw opinions per test case); KEPT_BUNDLE: the bundle whose
``single_volume_calibration`` was in use before. Prints, per input, AUC / ECE / NLL / Brier with the kept and the
refitted calibration, and the ECE averaged over the inputs (decision15's rule). Run from the repository root.
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "training"))
from calibrate_single_volume import case_metrics, recalibrate  # noqa: E402
from umlcore.bundle import load_bundle  # noqa: E402


def main(report_path: str, kept_bundle: str) -> None:
    report = json.loads(Path(report_path).read_text())
    kept = load_bundle(kept_bundle).card.single_volume_calibration
    refit = report["single_volume_calibration"]
    print(f"kept: slope {kept['slope']:.4f} intercept {kept['intercept']:.4f}; "
          f"refit: slope {refit['slope']:.4f} intercept {refit['intercept']:.4f}")
    print(f"{'input':12} {'cases':>5}  AUC    ECE kept / refit   NLL kept / refit   Brier kept / refit")
    eces = {"kept": [], "refit": []}
    for mode in report["test"]:
        rows = [r for r in report["test_cases"] if r["mode"] == mode]
        labels = np.array([r["label"] for r in rows])
        m = {k: case_metrics(recalibrate(rows, c), labels) for k, c in (("kept", kept), ("refit", refit))}
        for k in eces:
            eces[k].append(m[k]["ece"])
        print(f"{mode:12} {len(rows):5}  {m['refit']['auc']:.3f}  {m['kept']['ece']:.3f} / {m['refit']['ece']:.3f}"
              f"      {m['kept']['nll']:.3f} / {m['refit']['nll']:.3f}      "
              f"{m['kept']['brier']:.3f} / {m['refit']['brier']:.3f}")
    print(f"mean ECE over the inputs: kept {np.mean(eces['kept']):.4f}, refit {np.mean(eces['refit']):.4f}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
