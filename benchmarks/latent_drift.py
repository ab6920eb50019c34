"""Per-iteration record of the encoder's latent norm, the codebook norm and the loss parts while the ``vqvae``
bundle trains (issue 18: the MNI152 main job run for 60 epochs collapsed after epoch ~14).

Runs the bundle's own ``train#trainer`` (``configs/train.json`` with the given overrides) and appends one JSON line
per iteration: ``it``, ``loss``, ``recon``, ``q`` (commitment loss), ``z`` (mean l2 norm of the encoder output
vectors), ``cb`` (mean norm of the codebook vectors), ``restarts`` (dead-code restarts so far), ``grad`` (global
gradient norm), ``lr``, ``perp`` (batch perplexity). ``--plot`` draws the norms, the commitment loss and the
validation SSIM of two or more such runs side by side.

    cd bundles/vqvae
    python ../../benchmarks/latent_drift.py --out $TMPDIR/drift_off \\
        --override '{"max_epochs": 60, "time_budget_minutes": null, "network_def#model#normalize_latents": false}'
    python ../../benchmarks/latent_drift.py --out $TMPDIR/drift_on \\
        --override '{"max_epochs": 60, "time_budget_minutes": null}'
    python ../../benchmarks/latent_drift.py --plot --png ../vqvae/docs/latent_drift.png \\
        "0.3.0=$TMPDIR/drift_off" "l2 latents=$TMPDIR/drift_on"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser


def record(out: Path, overrides: dict) -> Path:
    parser = ConfigParser()
    parser.read_config("configs/train.json")
    parser.update({"output_dir": str(out), **overrides})
    for _ in parser.get_parsed_content("initialize"):
        pass
    trainer = parser.get_parsed_content("train#trainer")
    network = parser.get_parsed_content("network")
    quantizer = network.quantizer
    latent_norm: dict[str, float] = {}
    quantizer.register_forward_pre_hook(
        lambda _m, args: latent_norm.__setitem__("z", float(args[0].detach().float().norm(dim=1).mean()))
    )
    path = out / "latent_drift.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.open("w")

    @trainer.on(Events.ITERATION_COMPLETED)
    def _log(engine) -> None:
        o = engine.state.output
        grads = [p.grad.float().pow(2).sum() for p in network.parameters() if p.grad is not None]
        row = {
            "it": engine.state.iteration,
            "loss": float(o["loss"]),
            "recon": float(o["recon_loss"]),
            "q": float(o["quantizer_loss"]),
            "z": latent_norm.get("z"),
            "cb": float(quantizer.codebook.norm(dim=1).mean()),
            "restarts": int(quantizer.restarts),
            "grad": float(torch.stack(grads).sum().sqrt()) if grads else 0.0,
            "lr": engine.optimizer.param_groups[0]["lr"],
            "perp": float(o.get("perplexity", 0.0)),
        }
        log.write(json.dumps(row) + "\n")
        log.flush()

    trainer.run()
    log.close()
    return path


def plot(runs: list[str], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for spec in runs:
        label, folder = spec.split("=", 1)
        rows = [json.loads(x) for x in (Path(folder) / "latent_drift.jsonl").read_text().splitlines() if x.strip()]
        its = [r["it"] for r in rows]
        (line,) = axes[0].plot(its, [r["z"] for r in rows], label=f"{label}: |z| encoder")
        axes[0].plot(its, [r["cb"] for r in rows], "--", color=line.get_color(), label=f"{label}: |e| codebook")
        axes[1].semilogy(its, [r["q"] for r in rows], color=line.get_color(), label=label)
        hist = [json.loads(x) for x in (Path(folder) / "logs" / "history.jsonl").read_text().splitlines() if x.strip()]
        val = [(h["epoch"], h["ssim"]) for h in hist if h.get("phase") == "validation"]
        axes[2].plot([e for e, _ in val], [s for _, s in val], "o-", ms=3, color=line.get_color(), label=label)
    axes[0].set(xlabel="iteration", ylabel="mean l2 norm (log)", title="latent and codebook vector norms", yscale="log")
    axes[1].set(xlabel="iteration", ylabel="commitment loss", title="commitment loss (0.25 |z - sg(e)|^2)")
    axes[2].set(xlabel="epoch", ylabel="validation SSIM", title="validation SSIM", ylim=(0.5, 1.0))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(png)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="with --plot: label=output_dir")
    p.add_argument("--out", type=Path, help="output_dir of the training run to record")
    p.add_argument("--override", default="{}", help="JSON dict of config overrides")
    p.add_argument("--plot", action="store_true")
    p.add_argument("--png", type=Path, default=Path("latent_drift.png"))
    args = p.parse_args(argv)
    if args.plot:
        plot(args.runs, args.png)
    else:
        print(record(args.out, json.loads(args.override)))


if __name__ == "__main__":
    main()
