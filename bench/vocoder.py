"""A vocoder-shaped model (HiFi-GAN / MelGAN shape) coded at -b 1 / 2 / 3, data-free and calibrated.

The model maps a mel-like input ``[B, 80, T]`` to a waveform ``[B, 1, 64 T]``: a ``Conv1d(80, 128, 7)``, two
``ConvTranspose1d`` upsamplings by 8 each followed by a residual block of two dilated ``Conv1d`` (dilations 1 and
3), and a ``Conv1d(32, 1, 7)`` with ``tanh``; LeakyReLU(0.1) between; every convolution under
``torch.nn.utils.parametrizations.weight_norm`` (``--old-weight-norm``: ``torch.nn.utils.weight_norm``, the hook
form). 267,394 stored values.

The task is synthetic but learnable, and the model trained on it (not a random teacher distilled: trained weights
have the structure, row scales and per-layer sensitivities a random initialisation lacks, and a random teacher's
output is mostly the noise of its weights): an additive synthesizer of 80 partials whose waveform is
``y[t] = sum_c a_c(t) sin(2 pi m_c t / 64 + phi_c) / 8``, each partial's frequency a multiple ``m_c`` of the frame
rate (so its phase repeats every 64-sample frame: the waveform is a function of the frames, which a vocoder can
learn), its amplitude ``a_c`` a smooth random envelope given once a frame and interpolated linearly; the input is
``log(a + 0.01)``, the log-mel stand-in. Trained ``--steps`` Adam steps (batch 8, 16 frames; scored on 32), cached under
bench/.cache (never retrained once there).

Each budget is written by ``codec.save`` data-free and with ``calibration=`` (256 training inputs, repair at its
default), decoded with ``codec.load_into`` into a fresh model, and scored on 64 held-out inputs: the waveform's
relative MSE against the float model's (``sum (y_hat - y)^2 / sum y^2``). ``--sources`` adds, per file, the output
error of each stored tensor decoded alone (the rest float): where the error comes from::

    OMP_NUM_THREADS=1 PYTHONPATH=<tree> python bench/vocoder.py -b 1 2 3 --out /tmp/x.json [--sources]

Run as a script path so that ``codec`` comes from the tree on PYTHONPATH (main or a branch) in the same minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

CACHE = Path(__file__).parent / ".cache"
MELS, HOP, FRAMES = 80, 64, 32


def _wn(module: nn.Module, old: bool) -> nn.Module:
    if old:
        return torch.nn.utils.weight_norm(module)
    return torch.nn.utils.parametrizations.weight_norm(module)


class ResBlock(nn.Module):
    """HiFi-GAN's ResBlock2: ``x + conv(leaky(x))`` for each dilation."""

    def __init__(self, channels: int, old: bool, dilations=(1, 3)):
        super().__init__()
        self.convs = nn.ModuleList(_wn(nn.Conv1d(channels, channels, 3, dilation=d, padding=d), old)
                                   for d in dilations)

    def forward(self, x):
        for conv in self.convs:
            x = x + conv(nn.functional.leaky_relu(x, 0.1))
        return x


class Vocoder(nn.Module):
    """Mel-like ``[B, 80, T]`` -> waveform ``[B, 1, 64 T]``."""

    def __init__(self, old: bool = False):
        super().__init__()
        self.pre = _wn(nn.Conv1d(MELS, 128, 7, padding=3), old)
        self.up1 = _wn(nn.ConvTranspose1d(128, 64, 16, stride=8, padding=4), old)
        self.res1 = ResBlock(64, old)
        self.up2 = _wn(nn.ConvTranspose1d(64, 32, 16, stride=8, padding=4), old)
        self.res2 = ResBlock(32, old)
        self.post = _wn(nn.Conv1d(32, 1, 7, padding=3), old)

    def forward(self, mel):
        x = self.pre(mel)
        x = self.res1(self.up1(nn.functional.leaky_relu(x, 0.1)))
        x = self.res2(self.up2(nn.functional.leaky_relu(x, 0.1)))
        return torch.tanh(self.post(nn.functional.leaky_relu(x, 0.1)))


def synth(n: int, seed: int, frames: int = FRAMES) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log amplitudes [n, 80, frames], waveforms [n, 1, 64 frames])`` of the additive synthesizer."""
    g = torch.Generator().manual_seed(seed)
    p = torch.Generator().manual_seed(1234)  # the partials: the same for every set
    m = torch.randint(1, 32, (MELS,), generator=p).double()
    phi = torch.rand(MELS, generator=p).double() * 2 * math.pi
    # smooth envelopes: a random walk smoothed over frames, squashed to [0, 1], most partials quiet at a time
    walk = torch.randn(n, MELS, frames + 4, generator=g).double().cumsum(-1) * 0.5
    walk = nn.functional.avg_pool1d(walk, 5, 1)
    amp = torch.sigmoid(walk - 2.0 + torch.randn(n, MELS, 1, generator=g).double())
    t = torch.arange(frames * HOP).double()
    frame = t / HOP
    lo = frame.floor().long().clamp(max=frames - 1)
    hi = (lo + 1).clamp(max=frames - 1)
    w = (frame - lo).view(1, 1, -1)
    env = amp[:, :, lo] * (1 - w) + amp[:, :, hi] * w  # [n, 80, 64 frames]
    carrier = torch.sin(2 * math.pi * m.view(-1, 1) * t / HOP + phi.view(-1, 1))  # [80, samples]
    wave = (env * carrier).sum(1, keepdim=True) / 8
    return torch.log(amp + 0.01).float(), wave.float()


def trained(seed: int = 0, steps: int = 500, old: bool = False) -> Vocoder:
    """The model trained ``steps`` Adam steps on the synthesizer (cached)."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"vocoder_seed{seed}_s{steps}{'_old' if old else ''}.pt"
    torch.manual_seed(seed)
    model = Vocoder(old)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        mel, wave = synth(8, 10_000 + step, 16)
        loss = nn.functional.mse_loss(model(mel), wave)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: mse {loss.item():.5f} (target power {wave.pow(2).mean().item():.5f})",
                  file=sys.stderr)
    torch.save(model.state_dict(), path)
    return model.eval()


def rel_mse(model: nn.Module, ref: torch.Tensor, mel: torch.Tensor) -> float:
    with torch.no_grad():
        out = model(mel)
    return float((out - ref).pow(2).sum() / ref.pow(2).sum())


def _layer(name: str) -> str:
    """The layer a stored tensor belongs to (``up1.parametrizations.weight.original1``, ``up1.weight_v``,
    ``up1.bias`` -> ``up1``)."""
    if ".parametrizations." in name:
        return name.split(".parametrizations.")[0]
    return name.rpartition(".")[0]


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> None:
    import codec

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-b", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    ap.add_argument("--modes", default="datafree,calibrated")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--old-weight-norm", action="store_true")
    ap.add_argument("--sources", action="store_true", help="each stored tensor's output error alone")
    ap.add_argument("--measured-transposed", action="store_true",
                    help="codec.rd.calibrate.TRANSPOSED_UNDER_REPAIR = True: transposed convolutions weighed as "
                         "measured under repair")
    ap.add_argument("--off", default="", help="comma-separated codec.rd.repair.fit switches set False "
                    "(COMPUTED_LAYERS, TRANSPOSED_BIAS): the repair of before the twenty-ninth pass, in part")
    ap.add_argument("--tag", default="", help="a label for the rows")
    ap.add_argument("--out", help="append the rows as JSON lines here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.measured_transposed:
        from codec.rd import calibrate

        calibrate.TRANSPOSED_UNDER_REPAIR = True
    for name in filter(None, args.off.split(",")):
        from codec.rd.repair import fit

        assert hasattr(fit, name), name
        setattr(fit, name, False)
    model = trained(0, args.steps, args.old_weight_norm)
    mel_test, wave_test = synth(64, 1)
    calib, _ = synth(args.calib, 2)
    with torch.no_grad():
        ref = model(mel_test)
    print(f"codec from {Path(codec.__file__).parent}; float model: rel MSE against the synthesizer "
          f"{float((ref - wave_test).pow(2).sum() / wave_test.pow(2).sum()):.4f}; "
          f"{sum(v.numel() for v in model.state_dict().values()):,} stored values", file=sys.stderr)
    weights = sum(v.numel() for v in model.state_dict().values())
    for b in args.b:
        for mode in args.modes.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "v.jwt"
                kwargs = {"calibration": calib} if mode == "calibrated" else {}
                if mode == "norepair":
                    kwargs = {"calibration": calib, "repair": False}
                start = cpu()
                notes = codec.save(model, path, bits_per_weight=b, **kwargs)
                spent = cpu() - start
                size = path.stat().st_size
                fresh = Vocoder(args.old_weight_norm)
                codec.load_into(fresh, path)
                fresh.eval()
                row = {"tag": args.tag, "b": b, "mode": mode, "rel_mse": rel_mse(fresh, ref, mel_test), "bytes": size,
                       "bpw": 8 * size / weights, "cpu_s": round(spent, 1)}
                if args.sources:  # each layer's decoded tensors (g, v, bias: repair moves a bias for its v) alone
                    decoded = fresh.state_dict()
                    floats = model.state_dict()
                    layers: dict[str, list[str]] = {}
                    for name in decoded:
                        layers.setdefault(_layer(name), []).append(name)
                    alone = {}
                    for layer, names in layers.items():
                        if all(torch.equal(decoded[n], floats[n]) for n in names):
                            continue
                        probe = Vocoder(args.old_weight_norm)
                        probe.load_state_dict({**floats, **{n: decoded[n] for n in names}})
                        alone[layer] = round(rel_mse(probe.eval(), ref, mel_test), 5)
                    row["alone"] = alone
            print(json.dumps(row), flush=True)
            for note in notes or []:
                print("   ", str(note)[:400], file=sys.stderr)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
