set -u
mkdir -p /tmp/site && tar -xJf .carry/sitk.tar.xz -C /tmp/site && python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .carry/nibabel-*.whl
export PYTHONPATH=/tmp/site:$PWD/UMLCore:$PWD/training
nproc; python3 -c "import torch, numpy, scipy, SimpleITK; print(torch.__version__, numpy.__version__, torch.cuda.get_device_name())"
C="--train-cases 1000 --new-cases-per-epoch 250 --val-cases 64 --case-shape 24 256 256 --epochs 20 --steps-per-epoch 400 --batch-size 32 --crop 192 --lr 0.001 --warmup-steps 100 --kl-anneal-epochs 0 --lesion-fraction 0.5 --single-volume-prob 0.15 --noise-max 0.1 --lesion-sampling lesion --workers 15 --compile off --max-minutes 7.9"
timeout 565 python3 training/train.py --out runs/gpu9 $C --init Resources/Models/uml-breast-dce-small --context-slices 1 2>&1 | grep -v "^\s*$" | tr '\r' '\n' | grep -v "\[#" ; echo "train rc ${PIPESTATUS[0]}"
nvidia-smi --query-gpu=memory.used,memory.total --format=csv
tar -cf $OUT/gpu9.tar runs/gpu9 && ls -la $OUT
