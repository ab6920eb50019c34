"""The shared describe_mismatch names no stage's setting: the autoencoder's, the prior's and diffusion's hints come
from the stages, registered when a stage package is imported."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
from vqvae_medical.networks import VQVAE, GatedPixelCNN
from vqvae_medical.training.mismatch import describe_mismatch

def vqvae(k):
    return VQVAE(2, 1, channels=[4, 8], num_res_units=1, res_channels=[4, 4], num_embeddings=k, embedding_dim=4)

def pixelcnn(classes):
    return GatedPixelCNN(2, 8, num_classes=classes, channels=8, num_layers=2)

def messages():
    prior = describe_mismatch(pixelcnn(None), pixelcnn(3).state_dict())
    return describe_mismatch(vqvae(32), vqvae(16).state_dict()), prior

assert not any(m.startswith("vqvae_medical.stages") for m in sys.modules), sorted(sys.modules)
print(*messages(), sep="\\n")
import vqvae_medical.stages.autoencoder, vqvae_medical.stages.prior
print(*messages(), sep="\\n")
"""


def test_the_shared_layer_alone_names_no_stage_setting():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    alone_vqvae, alone_prior, vqvae, prior = proc.stdout.strip().splitlines()
    for line in (alone_vqvae, alone_prior):
        assert line.endswith("pass the settings it was trained with."), line
        assert "num_embeddings" not in line and "num_classes" not in line and "res_channels" not in line, line
    assert "num_embeddings is 16 in the checkpoint and 32 here: pass --num_embeddings 16" in vqvae, vqvae
    assert "it was trained with 3 classes: pass --num_classes 3" in prior, prior
