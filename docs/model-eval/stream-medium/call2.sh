set -u
mkdir -p /tmp/site && tar -xJf .carry/sitk.tar.xz -C /tmp/site && python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .carry/nibabel-*.whl
export PYTHONPATH=/tmp/site:$PWD/UMLCore:$PWD/training
timeout 570 python3 training/train.py --out runs/gpu9 --resume --epochs 14 --lr 0.0007 --train-cases 750 --workers 13 --max-minutes 7.8 2>&1 | grep -v "^\s*$" | tr '\r' '\n' | grep -v "\[#" ; echo "train rc ${PIPESTATUS[0]}"
tar -cf $OUT/gpu9.tar runs/gpu9 && ls -la $OUT
