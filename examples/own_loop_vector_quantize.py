"""Your own training loop, your own VQ library, logged for SQ-VAE Explorer with RunLogger.

A small convolutional autoencoder with vector-quantize-pytorch's `VectorQuantize` (EMA codebook)
between encoder and decoder, trained on the Fashion-MNIST subset shipped inside sqvae_core (works
offline). vector-quantize-pytorch reports no perplexity or code usage of its own; RunLogger
derives them from the indices it returns and writes a run directory the app reads live.

    pip install -r requirements.txt            # vector-quantize-pytorch comes with it
    python examples/own_loop_vector_quantize.py --out runs/own_vq --steps 600    # ~25 s on an idle 2-core CPU
    sqvae list runs                            # runs/own_vq   logged   fashion-mnist  K=64 ...
    streamlit run app/main.py                  # Train live / Compare: pick own_vq

Start the app first to see the curves, the usage raster and the codebook map grow while it trains.
The run has metrics and codebook snapshots but no model the app can rebuild: `sqvae eval` refuses it.
At the end the decoder is exported with RunLogger.save_decoder, with the codes of 64 test images:

    from sqvae_core.runlogger import load_decoder
    dec = load_decoder("runs/own_vq")
    codes = dec.indices.clone(); codes[0, 3, 3] = 5      # put code 5 at one position of image 0
    images = dec.decode(codes)                           # (64, 1, 28, 28)
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import VectorQuantize

from sqvae_core import RunLogger
from sqvae_core.data import SHIPPED_DIR, load_dataset


class Autoencoder(nn.Module):
    """28x28 image -> (dim, 7, 7) latents -> nearest of `codes` codebook vectors -> 28x28 image."""

    def __init__(self, dim: int = 32, codes: int = 64):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, dim, 4, 2, 1))
        self.vq = VectorQuantize(dim=dim, codebook_size=codes, decay=0.9, commitment_weight=0.25,
                                 accept_image_fmap=True)
        self.decoder = nn.Sequential(nn.ConvTranspose2d(dim, 32, 4, 2, 1), nn.ReLU(),
                                     nn.ConvTranspose2d(32, 1, 4, 2, 1), nn.Sigmoid())

    def forward(self, x):
        z_q, indices, commit = self.vq(self.encoder(x))      # indices: (B, 7, 7) int64
        return self.decoder(z_q), indices, commit


class DecodeCodes(nn.Module):
    """Code grids (B, 7, 7) -> images: the codebook lookup and the decoder (for RunLogger.save_decoder)."""

    def __init__(self, model: Autoencoder):
        super().__init__()
        self.decoder = model.decoder
        self.register_buffer("codebook", model.vq.codebook.detach().clone())     # (K, dim), as trained

    def forward(self, indices):
        return self.decoder(F.embedding(indices, self.codebook).permute(0, 3, 1, 2))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/own_vq", help="run directory to write (the app lists runs/*)")
    p.add_argument("--steps", type=int, default=600, help="training steps (~0.04 s each on an idle 2-core CPU)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--codes", type=int, default=64, help="codebook size K")
    p.add_argument("--dim", type=int, default=32, help="code dimension")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--snapshot-every", type=int, default=50)
    p.add_argument("--overwrite", action="store_true", help="replace a logged run already in --out")
    p.add_argument("--no-decoder", action="store_true", help="do not export the decoder (RunLogger.save_decoder)")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    data = load_dataset("fashion-mnist", "train", data_dir=str(SHIPPED_DIR), download=False)
    images = data.images.to(device)                           # (N, 1, 28, 28) in [0, 1]
    model = Autoencoder(args.dim, args.codes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    config = {**vars(args), "dataset": "fashion-mnist", "data_source": data.source, "n_train": len(data),
              "library": "vector-quantize-pytorch"}

    t0 = time.time()
    with RunLogger(args.out, codebook_size=args.codes, config=config, log_every=args.log_every,
                   snapshot_every=args.snapshot_every, overwrite=args.overwrite) as log:
        for step in range(1, args.steps + 1):
            x = images[torch.randint(len(images), (args.batch_size,), device=device)]
            x_rec, indices, commit = model(x)
            recon = F.mse_loss(x_rec, x)
            loss = recon + commit
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # tensors stay on the device: RunLogger reads them only when it writes a row
            log.log(step, indices=indices, codebook=model.vq.codebook, loss=loss, commit=commit,
                    mse=recon.detach() * x[0].numel())          # per-image sum of squared error, as the app plots
        if not args.no_decoder:
            # the codes of 64 test images and the decoder, so edited codes can be decoded later
            test = load_dataset("fashion-mnist", "test", data_dir=str(SHIPPED_DIR), download=False).images[:64]
            model.eval()
            with torch.no_grad():
                _, test_codes, _ = model(test.to(device))
            log.save_decoder(DecodeCodes(model), test_codes, images=test)
    print(f"{args.steps} steps in {time.time() - t0:.1f} s -> {args.out} (open it in the app's Train live page)")


if __name__ == "__main__":
    main()
