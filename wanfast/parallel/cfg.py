"""The per-pipeline runtime that ``WanPipeline.run`` calls when ``pipe.parallel`` is set: the text
broadcast, the CFG-parallel prediction and the tiled VAE decode."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from wanfast.parallel.dist import Mesh
from wanfast.parallel.vae import DEFAULT_OVERLAP, parallel_decode
from wanfast.pipeline import classifier_free_guidance, guided_prediction


class ParallelRuntime:
    def __init__(self, mesh: Mesh, dtype: torch.dtype, vae_overlap: int = DEFAULT_OVERLAP) -> None:
        self.mesh, self.dtype, self.vae_overlap = mesh, dtype, vae_overlap

    def encode(self, text_encoder, prompts: list[str], device: torch.device) -> list[Tensor]:
        """Rank 0 runs the text encoder; the [L_i, text_dim] states are broadcast (shapes first)."""
        group = self.mesh.world_group
        if self.mesh.rank == 0:
            states = [s.to(device=device, dtype=self.dtype) for s in text_encoder.encode(prompts)]
            shapes = torch.tensor([list(s.shape) for s in states], device=device)
        else:
            shapes = torch.empty(len(prompts), 2, dtype=torch.int64, device=device)
        dist.broadcast(shapes, 0, group=group)
        if self.mesh.rank != 0:
            states = [torch.empty(*s, dtype=self.dtype, device=device) for s in shapes.tolist()]
        for s in states:
            dist.broadcast(s.contiguous(), 0, group=group)
        return states

    def predict(
        self, model: nn.Module, x: Tensor, t: Tensor, context: list[Tensor], context_null: list[Tensor],
        scale: float,
    ) -> Tensor:  # fmt: skip
        """Guided prediction [1, C, F', H', W']. CFG-parallel: group 0 runs the conditional pass, group 1
        the unconditional one; the pair all-gathers both and each combines them identically, so every
        rank takes the same solver step and the latents stay in sync without a broadcast."""
        if self.mesh.cfg == 1 or scale == 1.0:
            return guided_prediction(model, x, t, context, context_null, scale)
        mine = model(x, t, context if self.mesh.cfg_index == 0 else context_null).contiguous()
        cond, uncond = torch.empty_like(mine), torch.empty_like(mine)
        dist.all_gather([cond, uncond], mine, group=self.mesh.cfg_group)
        return classifier_free_guidance(cond, uncond, scale)

    def decode(
        self, vae: nn.Module, latents: Tensor, on_frames: Callable[[Tensor], None] | None = None
    ) -> Tensor:
        """The tiled decode (``parallel_decode``). ``on_frames`` (``WanVAE.decode``'s) is called once, with
        the whole blended video: the ranks split each frame into tiles and blend the seams only after
        every rank has decoded all frames, so no frame is final earlier. Same values, no overlap."""
        video = parallel_decode(vae, latents, self.mesh.world_group, self.vae_overlap)
        if on_frames is not None:
            on_frames(video)  # the returned tensor itself: a blend of clamped tiles, not clamped again
        return video
