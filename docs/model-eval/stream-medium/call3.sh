set -u
mkdir -p /tmp/site && tar -xJf .carry/sitk.tar.xz -C /tmp/site && python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .carry/nibabel-*.whl
export PYTHONPATH=/tmp/site:$PWD/UMLCore:$PWD/training
C="--train-cases 400 --val-cases 32 --case-shape 24 256 256 --epochs 30 --steps-per-epoch 200 --batch-size 32 --crop 192 --lr 0.002 --warmup-steps 100 --lesion-fraction 0.5 --single-volume-prob 0.15 --noise-max 0.1 --lesion-sampling lesion --workers 8 --compile off --max-minutes 6.9 --context-slices 1 --cls-pool avg+max+lesion"
for p in small medium; do
  timeout 545 python3 training/train.py --out runs/gpu10-$p --preset $p $C > runs/$p.log 2>&1 &
done
wait
for p in small medium; do echo "== $p"; tr '\r' '\n' < runs/$p.log | grep -v "\[#" | grep -v "^\s*$" | cut -c1-150; cp runs/$p.log runs/gpu10-$p/; done
tar -cf $OUT/gpu10.tar runs/gpu10-small runs/gpu10-medium && ls -la $OUT
