#!/usr/bin/env bash
# The main job on the bundled model: encode the Fashion-MNIST MLP at the seed
# setting (first layer as 28x28 tiles, JPEG quality 20), inspect, decode, and
# report size and accuracy before/after. Outputs go to out/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p out
set -x
jwt encode fixtures/mlp_fmnist.pt -o out/mlp.jwt --row-shape 28x28 --quality 20
jwt info out/mlp.jwt
jwt decode out/mlp.jwt -o out/mlp_decoded.pt
python3 examples/accuracy.py fixtures/mlp_fmnist.pt out/mlp_decoded.pt out/mlp.jwt
