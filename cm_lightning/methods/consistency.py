"""ConsistencyModule: what the consistency methods (CT / iCT, CD, ECT) share on top of GenerativeModule.

The parametrisation f_θ (``ConsistencyFunction``), the starting weights (``init_from``: a diffusion
model's F weights, read with weights_only=True), and the fixed σ pairs of their validation losses.
"""

import torch
from torch import Tensor, nn

from cm_lightning.core.conditioning import bind_labels
from cm_lightning.core.karras import karras_sigmas
from cm_lightning.core.noise import indexed_noise
from cm_lightning.core.structure import network_differences
from cm_lightning.io.module_paths import with_canonical_net
from cm_lightning.io.teacher_file import DiffusionWeights, read_diffusion_checkpoint
from cm_lightning.methods.base import GenerativeModule, file_network
from cm_lightning.methods.diffusion import DiffusionModule
from cm_lightning.nets.preconditioning import ConsistencyFunction


class ConsistencyModule(GenerativeModule):
    """Base of the consistency methods: f_θ with f(x, σ_min) = x, optionally started from a diffusion model."""

    def __init__(self, net: nn.Module | None = None, init_from: str | None = None, init_weights: str | None = None, **kwargs):
        """
        Args:
            net: the network F_θ; see GenerativeModule.
            init_from: a DiffusionModule checkpoint whose F weights every network (online, EMAs, θ⁻) starts
                from when ``fit`` starts (ECT's tuning; any consistency method accepts it). Read with
                weights_only=True; its network settings must equal ``net``'s. A resumed run takes its
                weights from its own checkpoint and does not read this file.
            init_weights: which of that checkpoint's networks: "online", "ema", "ema_<decay>"; None takes its
                own eval_weights.
            **kwargs: the settings every method shares (GenerativeModule).
        """
        super().__init__(net=net, **kwargs)
        self._started = False  # the networks hold their starting weights (given, or from a checkpoint)
        self._init_sha256: str | None = None

    def wrap(self, net: nn.Module) -> ConsistencyFunction:
        return ConsistencyFunction(net, self.hparams.sigma_min, self.hparams.sigma_data)

    def training_levels(self) -> list[float] | None:
        """The fixed noise levels the method trains f on, descending, if it has such a grid (CD); None if its
        levels move or are continuous (CT's curriculum, ECT), so a step search takes a grid of its own."""
        return None

    # -- starting weights ---------------------------------------------------------------------

    def read_diffusion_file(self, path: str, weights: str | None, role: str) -> DiffusionWeights:
        """The network weights of a DiffusionModule file (``init_from``, CD's teacher), refused (naming the file and
        the settings that differ) if its network is not this model's."""
        found = read_diffusion_checkpoint(path, weights, role=role, expected=DiffusionModule)
        differ = network_differences(file_network(found.hparams), with_canonical_net(dict(self.hparams)))
        if differ:
            raise ValueError(f"the {role} {path!r} has another network than the student: " + "; ".join(differ)
                             + ". Give the student that checkpoint's settings (its config.yaml's model.init_args.net).")
        return found

    def read_init_from(self) -> dict[str, Tensor]:
        """F's weights of ``init_from``, refused (naming the file) if its network differs from ``net``."""
        found = self.read_diffusion_file(self.hparams.init_from, self.hparams.init_weights, "init_from")
        self._init_sha256 = found.sha256
        return found.net_state

    def starting_state(self) -> dict[str, Tensor] | None:
        """F's weights the networks start from in a new run: ``init_from``'s, or None (the network's own)."""
        return None if self.hparams.init_from is None else self.read_init_from()

    def on_fit_start(self) -> None:
        """Load the starting weights into every network, unless they came from a checkpoint (a resumed run,
        whose checkpoint Lightning has restored by now, or a model built by ``load_from_checkpoint``): a
        resumed run never reads ``init_from``. Runs before the first step (and the sanity check)."""
        if not self._started:
            state = self.starting_state()
            if state is not None:
                for f in self.networks():
                    f.net.load_state_dict(state)
            self._started = True

    def predict_step(self, batch, batch_idx: int):
        """Sample indices: images (GenerativeModule); an edit batch (``cm-lightning predict --edit.kind``, a dict
        with its ``task``): the task applied with the ``eval_weights`` network in eval mode, a class-conditional one
        conditioned on each item's ``predict_labels`` class (so an edit keeps the label it is given)."""
        if not isinstance(batch, dict):
            return super().predict_step(batch, batch_idx)
        labels = self.labels_for_indices(batch["index"].tolist())
        with self.evaluating() as f:
            return batch["task"](bind_labels(f, None if labels is None else labels.to(self.device)), batch,
                                 self.hparams.sigma_min)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._init_sha256 is not None:
            checkpoint["init_from_sha256"] = self._init_sha256

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._started = True
        self._init_sha256 = checkpoint.get("init_from_sha256", self._init_sha256)


def fixed_pairs(x: Tensor, index: Tensor, num_scales: int, sigma_min: float, sigma_max: float, rho: float):
    """(z, σ_n, σ_{n+1}) that never change, for validation losses: image i of the epoch gets pair
    n = i mod (num_scales − 1) of the Karras grid and noise seeded by i."""
    sigmas = karras_sigmas(num_scales, sigma_min, sigma_max, rho)
    n = index.cpu() % (len(sigmas) - 1)
    z = indexed_noise(0, index.tolist(), 1, x.shape[1:])[0]
    return z.to(x.device), sigmas[n].to(x.device, torch.float32), sigmas[n + 1].to(x.device, torch.float32)
