"""A MoCo-style feature queue: the global (video, text) embeddings of past steps, kept as extra
negatives for the global InfoNCE (`loss.queue_size`, 0 = off, the default).

- Entries are detached copies: no gradient flows into the past (MoCo, He et al. 2020, Sec. 3.2). There is
  no momentum encoder here: an entry is as old as queue_size / batch_size steps, so it was embedded by an
  older model. Keep the queue to a few batches.
- Under W ranks the queue holds the union batch (gathered embeddings), identical on every rank.
- The step's embeddings are staged by each forward and pushed when the optimizer step is done
  (`commit`): micro-batches of one step do not see each other, and a step interrupted half way leaves
  the queue as the last checkpointable point had it. `state_dict()` goes into the checkpoint, so a
  resumed run has the very queue of the uninterrupted run.
- A past entry may show the same video or caption as a row of the batch (a later epoch): a false
  negative, as in MoCo.
"""
from __future__ import annotations

import torch


class FeatureQueue:
    def __init__(self, size: int, dim: int, device: torch.device = torch.device("cpu")):
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size} (loss.queue_size=0 turns the queue off)")
        self.size, self.dim = size, dim
        self.video = torch.zeros(size, dim, device=device)  # [Q, E] ring buffer, rows [0, filled) are real
        self.text = torch.zeros(size, dim, device=device)  # [Q, E]
        self.ptr = 0  # next row to overwrite
        self.filled = 0
        self._staged: list[tuple[torch.Tensor, torch.Tensor]] = []

    def negatives(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored (video [n, E], text [n, E]) embeddings, n = entries so far (order is irrelevant to
        the loss: they all sit in the denominator)."""
        return self.video[: self.filled], self.text[: self.filled]

    def stage(self, video: torch.Tensor, text: torch.Tensor) -> None:
        """This forward's union-batch embeddings [B, E], pushed at `commit`."""
        self._staged.append((video.detach().float(), text.detach().float()))

    def commit(self) -> None:
        for video, text in self._staged:
            self._push(video, text)
        self._staged = []

    def discard(self) -> None:
        self._staged = []

    def _push(self, video: torch.Tensor, text: torch.Tensor) -> None:
        video, text = video[-self.size:], text[-self.size:]  # more rows than the queue: the newest stay
        n = len(video)
        rows = (self.ptr + torch.arange(n, device=self.video.device)) % self.size
        self.video[rows], self.text[rows] = video, text
        self.ptr = (self.ptr + n) % self.size
        self.filled = min(self.size, self.filled + n)

    def state_dict(self) -> dict:
        return {"video": self.video.cpu().clone(), "text": self.text.cpu().clone(),
                "ptr": torch.tensor(self.ptr), "filled": torch.tensor(self.filled)}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["video"].shape) != (self.size, self.dim):
            raise ValueError(f"checkpoint queue holds {tuple(state['video'].shape)} entries x dims, this run "
                             f"expects ({self.size}, {self.dim}); resume with the run's config")
        device = self.video.device
        self.video, self.text = state["video"].to(device).clone(), state["text"].to(device).clone()
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])
        self._staged = []
