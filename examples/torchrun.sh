#!/usr/bin/env sh
# Data-parallel sharpness-aware training with torchrun (gloo on CPU, NCCL on GPUs).
# Each command trains digits with SAM on 2 processes; rank 0 writes runs/<name>/.
set -e
# one eps from the global batch: the same steps as a single process on the whole batch
torchrun --nproc-per-node 2 -m samkit train --dataset digits --model mlp --optimizer sam \
    --epochs 5 --batch-size 128 --perturbation synced --name digits-sam-synced
# each replica perturbs with its own gradient (m-sharpness, m = batch / 2); one all-reduce less
torchrun --nproc-per-node 2 -m samkit train --dataset digits --model mlp --optimizer sam \
    --epochs 5 --batch-size 128 --perturbation local --name digits-sam-local
# continue a run (same number of processes), here to 10 epochs
torchrun --nproc-per-node 2 -m samkit train --dataset digits --model mlp --optimizer sam \
    --epochs 10 --batch-size 128 --perturbation local --name digits-sam-local --resume
