"""The losses that train the autoencoder of vae.py: reconstruction, KL, and an optional patch discriminator.

Training (one step; `loss_fn = VAELoss(...)`, `opt_ae` over `vae.parameters()`, `opt_d` over
`loss_fn.discriminator.parameters()` when a discriminator is used):

    x_rec, posterior = vae(x, generator=g)
    loss, logs = loss_fn(x, x_rec, posterior, step, last_layer=vae.decoder.conv_out.weight)
    opt_ae.zero_grad(); loss.backward(); opt_ae.step()
    loss_d, logs_d = loss_fn.discriminator_loss(x, x_rec.detach(), step)
    opt_d.zero_grad(); loss_d.backward(); opt_d.step()

Normalisation of the losses, as the original `LPIPSWithDiscriminator` (without its LPIPS term): the
reconstruction loss (L1 or squared error) and the KL are each summed over one sample's elements and
averaged over the batch, so `kl_weight` means what it means in the SD config (1e-6). The generator's
hinge term -mean(D(x_rec)) is multiplied by an adaptive weight
||grad rec|| / (||grad gan|| + 1e-4) (clamped to [0, 1e4], times `disc_weight`), both gradients taken
with respect to the decoder's last layer, and switched on once `step >= disc_start`. There is no
perceptual (LPIPS) term: it needs an ImageNet-pretrained VGG, and minildm trains offline from nothing.
Both calls return `logs`, a dict of plain floats (rec, rec_per_element, kl, g, d_weight, loss;
d_loss, logits_real, logits_fake).
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from .vae import DiagonalGaussian


class PatchDiscriminator(nn.Module):
    """The original's NLayerDiscriminator (pix2pix PatchGAN): a grid of real/fake logits, one per patch.

    Stride-2 4x4 convs, then a stride-1 conv and a stride-1 conv to one channel; BatchNorm + LeakyReLU
    between them. For 32x32 inputs and n_layers=3 the logit grid is 2x2, each seeing a 70x70 field of
    view clipped to the image; n_layers=2 gives 6x6 patches of 34 pixels. Trained from scratch.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # the DCGAN initialisation the original uses
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: zero once real logits are >= 1 and fake logits are <= -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float = 1.0) -> torch.Tensor:
    """||d rec / d last_layer|| / (||d g / d last_layer|| + 1e-4), clamped to [0, 1e4], times disc_weight.

    Balances the adversarial gradient against the reconstruction gradient at the decoder's output
    layer (Esser et al. 2021, eq. 7), so neither drowns the other whatever their raw scales.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach() * disc_weight


class VAELoss(nn.Module):
    """Reconstruction + kl_weight * KL (+ adaptive weight * generator hinge loss from step disc_start).

    `discriminator` is None for a plain VAE, or a PatchDiscriminator owned by this module (its
    parameters are the second optimiser's). See the module docstring for the training step.
    """

    def __init__(self, kl_weight: float = 1e-6, rec_loss: str = "l1",
                 discriminator: PatchDiscriminator | None = None, disc_start: int = 0,
                 disc_weight: float = 0.5, disc_factor: float = 1.0):
        super().__init__()
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        self.kl_weight = kl_weight
        self.rec_loss = rec_loss
        self.discriminator = discriminator
        self.disc_start = disc_start
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor

    def discriminator_active(self, step: int) -> bool:
        """Whether the adversarial terms are on at this training step."""
        return self.discriminator is not None and self.disc_factor > 0 and step >= self.disc_start

    def reconstruction(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """|x - x_rec| or (x - x_rec)^2, summed per sample, averaged over the batch."""
        diff = (x - x_rec).abs() if self.rec_loss == "l1" else (x - x_rec).pow(2)
        return diff.sum() / x.shape[0]

    def forward(self, x: torch.Tensor, x_rec: torch.Tensor, posterior: DiagonalGaussian, step: int,
                last_layer: torch.Tensor | None = None):
        """The autoencoder's loss and a dict of floats to log (rec, kl, g, d_weight, loss)."""
        rec = self.reconstruction(x, x_rec)
        kl = posterior.kl().mean()
        loss = rec + self.kl_weight * kl
        logs = {"rec": rec.item(), "kl": kl.item(), "rec_per_element": rec.item() / x[0].numel()}
        if self.discriminator_active(step):
            g_loss = -self.discriminator(x_rec).mean()
            if torch.is_grad_enabled() and last_layer is not None:
                d_weight = adaptive_weight(rec, g_loss, last_layer, self.disc_weight)
            else:  # evaluation: the adaptive weight needs gradients; log the term, add nothing
                d_weight = torch.zeros((), device=x.device)
            loss = loss + self.disc_factor * d_weight * g_loss
            logs.update(g=g_loss.item(), d_weight=d_weight.item())
        logs["loss"] = loss.item()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, x_rec: torch.Tensor, step: int):
        """The discriminator's hinge loss on real x and (detached) x_rec, and floats to log.

        Before `disc_start` (or without a discriminator) it is a zero that backpropagates to nothing.
        """
        if not self.discriminator_active(step):
            return torch.zeros((), device=x.device, requires_grad=True), {}
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(x_rec.detach())
        loss_d = self.disc_factor * hinge_d_loss(logits_real, logits_fake)
        logs = {"d_loss": loss_d.item(), "logits_real": logits_real.mean().item(),
                "logits_fake": logits_fake.mean().item()}
        return loss_d, logs
