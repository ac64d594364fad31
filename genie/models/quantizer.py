"""Vector quantizer that resists codebook collapse.

Dimension keys:
    M: number of vectors quantized at once (all leading dims flattened, e.g. B*T*N)
    X: number of dead codes being restarted
    Z: code dimension (code_dim)
    V: codebook size (num_codes)

Design:
  * Codes and inputs are l2-normalised and matched by cosine similarity (Yu et al. 2021, "Vector-quantized
    image modeling with improved VQGAN"): on the unit sphere no code can sit far away from the data with a
    huge norm, and every code competes on direction only, which keeps many codes in play.
  * The codebook learns from a codebook loss (||sg(z) - c||^2) plus the commitment loss (beta * ||z - sg(c)||^2),
    not from EMA k-means updates: gradients are averaged across ranks by DDP for free, work unchanged under
    any optimizer / mixed precision / gradient accumulation, and need no extra decay hyper-parameter; EMA
    would need its own all-reduce of cluster statistics every step. (Keep the codebook out of weight decay:
    with normalised lookup its norm is meaningless, and decaying it only inflates its effective step size.)
  * Dead-code restarts: a code that no input picked for ``dead_code_threshold`` training steps is re-set to a
    random encoder output of the current batch, drawn with probability proportional to its quantization
    error (so new codes go where the live ones fit worst, not onto the majority content), and capacity
    lost to collapse comes back. Usage counts are all-reduced and the new codes broadcast from rank 0, so
    all DDP ranks keep identical codebooks.
  * Straight-through estimator: the forward pass uses the code, the backward pass copies the gradient to
    the (normalised) encoder output.
  * ``metric="euclidean"`` instead matches raw vectors by squared distance, for codes that live in a space whose
    norm means something (the tokenizer's pixel codebook: a patch's brightness is its norm). Such a codebook can
    be k-means initialised from the first training batch (``kmeans_iters``): it then starts as the best
    fixed-rate patch code of the data instead of random vectors the losses must first drag onto it.

We write our own instead of using ``vector-quantize-pytorch``: the quantizer is ~150 readable lines central
to the tokenizer and LAM, and owning it lets us guarantee DDP-consistent restarts, fp32 lookups under
autocast, and a checkpoint layout (plain safetensors buffers) that never changes under us.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class QuantizerOutput:
    """Result of :meth:`VectorQuantizer.forward` (leading dims ``...`` are those of the input)."""

    quantized: Tensor  # (..., Z) codes in the forward pass (unit-norm under cosine), straight-through gradient to input
    ids: Tensor  # (...) long, index of the chosen code
    loss: Tensor  # () codebook loss + beta * commitment loss
    usage: Tensor  # () fraction of the V codes used by this batch (all ranks, when training under DDP)
    perplexity: Tensor  # () exp(entropy) of the batch's code histogram (V = uniform use, 1 = collapse)


def squared_distances(x_MZ: Tensor, c_VZ: Tensor) -> Tensor:
    """||x - c||^2 for every pair, without materialising the (M, V, Z) differences: (M, Z), (V, Z) -> (M, V)."""
    return (x_MZ.square().sum(-1, keepdim=True) - 2 * x_MZ @ c_VZ.T) + c_VZ.square().sum(-1)


def kmeans(x_MZ: Tensor, num_codes: int, iters: int, chunk: int = 20_000) -> Tensor:
    """Lloyd's k-means of the rows of ``x_MZ``: (M, Z) -> centroids (V, Z), V = ``num_codes``.

    Seeded from distinct random rows (with replacement and jitter when M < V); a centroid that loses all its rows
    keeps its place. Rows are assigned ``chunk`` at a time, so the (M, V) distances never exist at once.
    """
    M, V = x_MZ.shape[0], num_codes
    picks = torch.randperm(M, device=x_MZ.device)[:V] if M >= V else torch.randint(M, (V,), device=x_MZ.device)
    centroids_VZ = x_MZ[picks].clone()
    if M < V:
        centroids_VZ += 0.01 * torch.randn_like(centroids_VZ)
    for _ in range(iters):
        starts = range(0, M, chunk)
        ids_M = torch.cat([squared_distances(x_MZ[i : i + chunk], centroids_VZ).argmin(-1) for i in starts])
        sums_VZ = torch.zeros_like(centroids_VZ).index_add_(0, ids_M, x_MZ)
        counts_V1 = torch.bincount(ids_M, minlength=V).unsqueeze(1)
        centroids_VZ = torch.where(counts_V1 > 0, sums_VZ / counts_V1.clamp(min=1), centroids_VZ)
    return centroids_VZ


def in_distributed_run() -> bool:
    """True inside a torch.distributed process group of 2+ ranks (statistics must then be all-reduced)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(nn.Module):
    """l2-normalised VQ with codebook + commitment losses, straight-through gradients and dead-code restarts.

    Args:
        num_codes: V, codebook size.
        code_dim: Z, dimension of each code.
        beta: commitment loss weight.
        dead_code_threshold: restart a code unused for this many training steps (0 disables restarts).
        metric: "cosine" (l2-normalised codes and inputs) or "euclidean" (raw vectors, squared distance).
        kmeans_iters: Lloyd iterations of the k-means initialisation on the first training batch (0: none, the
            codebook starts random).
    """

    def __init__(
        self,
        num_codes: int = 1024,
        code_dim: int = 32,
        beta: float = 0.25,
        dead_code_threshold: int = 100,
        metric: str = "cosine",
        kmeans_iters: int = 0,
    ):
        super().__init__()
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.beta = beta
        self.dead_code_threshold = dead_code_threshold
        self.metric = metric
        self.kmeans_iters = kmeans_iters
        self.sync_distributed = True  # all-reduce usage and broadcast restarts when torch.distributed is up
        # False: restarts rewrite the codebook inside forward (restarted codes claim inputs in that very step).
        # True: they wait in `pending_restarts` for `apply_pending_restarts()` after the optimizer step; FSDP needs
        # this (inside forward the codebook is a view of a temporary gathered parameter: writes would be lost)
        self.defer_restarts = False
        self.pending_restarts: tuple[Tensor, Tensor] | None = None  # (code indices (X,), new codes (X, Z))
        self.codebook_VZ = nn.Parameter(F.normalize(torch.randn(num_codes, code_dim), dim=-1))
        # persistent buffers so a resumed run keeps its restart clock (saved in model.safetensors)
        self.register_buffer("steps_since_used_V", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("num_restarts", torch.zeros((), dtype=torch.long))  # total, for logging
        if kmeans_iters > 0:  # persistent, so a resumed run does not initialise its trained codebook again
            self.register_buffer("kmeans_done", torch.zeros((), dtype=torch.bool))
        self._kmeans_seen_done = False  # the buffer read True (or set) once: no need to read it every step

    def codes(self) -> Tensor:
        """(V, Z) codebook, float32 (unit-norm rows under the cosine metric)."""
        if self.metric == "euclidean":
            return self.codebook_VZ.float()
        return F.normalize(self.codebook_VZ.float(), dim=-1)

    def lookup(self, ids: Tensor) -> Tensor:
        """Code vectors for ids: (...) long -> (..., Z) float32."""
        return F.embedding(ids, self.codes())

    def _inputs(self, z: Tensor) -> Tensor:
        """(..., Z) any dtype -> (M, Z) float32 in the metric's space (l2-normalised under cosine)."""
        z_MZ = z.reshape(-1, self.code_dim).float()
        return z_MZ if self.metric == "euclidean" else F.normalize(z_MZ, dim=-1)

    def _match(self, z_MZ: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest codes of prepared inputs: (M, Z) -> (error (M,) >= 0, ids (M,) long)."""
        codes_VZ = self.codes()
        if self.metric == "euclidean":
            error_M, ids_M = squared_distances(z_MZ, codes_VZ).min(dim=-1)
            return error_M.clamp(min=0), ids_M
        best_M, ids_M = (z_MZ @ codes_VZ.T).max(dim=-1)  # cosine similarity
        return 1 - best_M, ids_M

    @torch.no_grad()
    def nearest(self, z: Tensor) -> Tensor:
        """Ids of the nearest codes under the metric, with no side effects: (..., Z) -> (...) long."""
        with torch.autocast(z.device.type, enabled=False):
            return self._match(self._inputs(z))[1].reshape(z.shape[:-1])

    @torch.no_grad()
    def kmeans_init(self, z_MZ: Tensor) -> None:
        """Set the codebook to :func:`kmeans` centroids (``kmeans_iters`` Lloyd steps) of prepared inputs (M, Z).

        Under DDP rank 0's centroids are broadcast. With ``defer_restarts`` (FSDP) the centroids are written after
        the step, as restarts are.
        """
        centroids_VZ = kmeans(z_MZ, self.num_codes, self.kmeans_iters)
        if self.metric == "cosine":
            centroids_VZ = F.normalize(centroids_VZ, dim=-1)
        if self.sync_distributed and in_distributed_run():
            dist.broadcast(centroids_VZ, src=0)
        self.kmeans_done.fill_(True)
        if self.defer_restarts:
            self.pending_restarts = (torch.arange(self.num_codes, device=z_MZ.device), centroids_VZ)
        else:
            self.codebook_VZ.copy_(centroids_VZ.to(self.codebook_VZ.dtype))

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize encoder outputs.

        In training mode this also updates the usage clock and restarts dead codes (before the lookup, so the
        codebook is never modified after autograd has saved it).

        Args:
            z: (..., Z) encoder outputs (any scale; they are l2-normalised here).

        Returns:
            QuantizerOutput; ``quantized`` has the input's dtype.
        """
        lead_shape = z.shape[:-1]
        # the lookup runs in fp32 even under bf16 autocast: argmax over 1024 near-equal cosines is sensitive
        with torch.autocast(z.device.type, enabled=False):
            z_MZ = self._inputs(z)
            with torch.no_grad():
                if self.training and self.kmeans_iters > 0 and not self._kmeans_seen_done:
                    if not bool(self.kmeans_done):  # a host sync, so only until the buffer is seen set
                        self.kmeans_init(z_MZ.detach())
                    self._kmeans_seen_done = True
                error_M, ids_M = self._match(z_MZ)
                restarts = self.training and self.dead_code_threshold > 0
                if restarts and self.restart_dead_codes(z_MZ, error_M=error_M):
                    ids_M = self._match(z_MZ)[1]  # restarted codes claim their inputs
            codes_VZ = self.codes()  # after any restart: autograd saves the codebook only from here on
            q_MZ = F.embedding(ids_M, codes_VZ)  # (M, Z), differentiable w.r.t. the codebook
            codebook_loss = F.mse_loss(q_MZ, z_MZ.detach())  # pulls codes towards the inputs they won
            commitment_loss = F.mse_loss(z_MZ, q_MZ.detach())  # keeps the encoder close to its codes
            quantized_MZ = z_MZ + (q_MZ - z_MZ).detach()  # straight-through estimator

        with torch.no_grad():
            counts_V = torch.bincount(ids_M, minlength=self.num_codes)
            if self.training:
                counts_V = self._update_usage(counts_V)
            probs_V = counts_V.float() / counts_V.sum().clamp(min=1)
            perplexity = torch.exp(-(probs_V * torch.log(probs_V.clamp(min=1e-10))).sum())
            usage = (counts_V > 0).float().mean()

        return QuantizerOutput(
            quantized=quantized_MZ.reshape(*lead_shape, self.code_dim).to(z.dtype),
            ids=ids_M.reshape(lead_shape),
            loss=codebook_loss + self.beta * commitment_loss,
            usage=usage,
            perplexity=perplexity,
        )

    @torch.no_grad()
    def _update_usage(self, counts_V: Tensor) -> Tensor:
        """Sum the batch's code counts over ranks and advance the per-code "steps since used" clock."""
        if self.sync_distributed and in_distributed_run():
            dist.all_reduce(counts_V)  # every rank then agrees on which codes are dead
        self.steps_since_used_V.add_(1).masked_fill_(counts_V > 0, 0)
        return counts_V

    @torch.no_grad()
    def restart_dead_codes(self, z_MZ: Tensor, error_M: Tensor | None = None) -> int:
        """Re-initialise codes unused for ``dead_code_threshold`` steps from rows of ``z_MZ``.

        Called automatically at the start of each training forward. The replacement rows are drawn at random
        (without replacement) with probability proportional to their quantization error when ``error_M`` is
        given: uniform draws would mostly land on the majority content (e.g. static background), which
        the live codes already cover, while the poorly-quantized rows are where extra codes pay off. Under DDP
        all ranks find the same dead codes (usage counts are all-reduced) and take rank 0's replacements.

        Args:
            z_MZ: (M, Z) current encoder outputs, in the metric's space (l2-normalised under cosine).
            error_M: (M,) optional non-negative quantization error of each row (1 - cosine, or squared distance).

        Returns:
            Number of codes restarted now (0 with ``defer_restarts``: they are applied after the step).
        """
        dead_V = self.steps_since_used_V >= self.dead_code_threshold
        if self.pending_restarts is not None:  # already restarted, not yet written (deferred): not dead again
            dead_V[self.pending_restarts[0]] = False
        num_dead = int(dead_V.sum())  # one host sync per training step
        if num_dead == 0:
            return 0
        M = z_MZ.shape[0]
        weights_M = torch.ones(M, device=z_MZ.device) if error_M is None else error_M.float().clamp(min=0)
        if int((weights_M > 0).sum()) < num_dead:  # too few candidates for distinct picks: add a uniform floor
            weights_M = weights_M + 1e-6
        replace = num_dead > M
        picks_X = torch.multinomial(weights_M, num_dead, replacement=replace)  # X = num_dead
        new_XZ = z_MZ[picks_X].float()  # (num_dead, Z) replacement codes
        if replace:  # fewer inputs than dead codes: jitter the repeats so the new codes differ
            new_XZ = new_XZ + 0.01 * torch.randn_like(new_XZ)
        if self.metric == "cosine":
            new_XZ = F.normalize(new_XZ, dim=-1)
        if self.sync_distributed and in_distributed_run():
            dist.broadcast(new_XZ, src=0)
        self.steps_since_used_V[dead_V] = 0
        self.num_restarts += num_dead
        if self.defer_restarts:  # (several forwards before one step, e.g. gradient accumulation: all of them)
            idx_X = dead_V.nonzero().squeeze(1)
            if self.pending_restarts is not None:
                idx_X = torch.cat([self.pending_restarts[0], idx_X])
                new_XZ = torch.cat([self.pending_restarts[1], new_XZ])
            self.pending_restarts = (idx_X, new_XZ)
            return 0  # nothing changed yet: the lookup keeps this step's codes
        self.codebook_VZ[dead_V] = new_XZ.to(self.codebook_VZ.dtype)
        return num_dead

    @torch.no_grad()
    def apply_pending_restarts(self) -> int:
        """Write deferred restarts (``defer_restarts``) into the codebook; returns the number of codes written.

        Under FSDP call it inside ``FullyShardedDataParallel.summon_full_params(..., writeback=True)`` on every
        rank (``StageModule.on_train_batch_end`` does), so the rows reach every shard.
        """
        if self.pending_restarts is None:
            return 0
        idx_X, new_XZ = self.pending_restarts
        self.pending_restarts = None
        if not bool(torch.isfinite(new_XZ).all()):  # from a step the non-finite guard skipped: drop them
            return 0
        self.codebook_VZ[idx_X] = new_XZ.to(self.codebook_VZ.dtype)
        return len(new_XZ)
