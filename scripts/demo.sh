#!/usr/bin/env bash
# The main job on a fresh machine: set up, then run the shipped model on the bundled sample case.
# Writes out/demo/UMLSyntheticBreastDCE-pre/{segmentation.nii.gz, uncertainty.nii.gz, summary.json, preview.png}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
sample=UMLSegmentation/Resources/SampleData/UMLSyntheticBreastDCE
uml predict "$sample-pre.nrrd,$sample-early.nrrd,$sample-late.nrrd" -o out/demo --preview --overwrite --progress bar
python - <<'PY'
import json
s = json.load(open("out/demo/UMLSyntheticBreastDCE-pre/summary.json"))
c = s["classification"]
print(f"{s['case_id']}: {c['predicted_class']} (p = {max(c['probabilities']):.2f}), uncertainty {c['uncertainty']:.2f}, "
      f"verdict {c['verdict']}; lesion {s['segments'][0]['volume_ml']:.2f} ml")
print("outputs in out/demo/UMLSyntheticBreastDCE-pre/ (open preview.png)")
PY
