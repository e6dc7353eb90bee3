"""What a run has done so far, saved in every checkpoint (``running_states.json``) and restored on resume."""

from __future__ import annotations

from dataclasses import dataclass, field

RNG_NOTE = "per-step generators seeded from (global_seed, global_step); data order from (global_seed, epoch)"


@dataclass
class TrainState:
    """The loop's position and counters. ``epoch_offset`` counts images of the current epoch consumed (over the global
    batch); ``bad_images`` those skipped as unreadable by every rank in earlier sessions (this session's are added when
    saving); ``grad_scaler``: the fp16 loss scaler's state (None otherwise)."""

    epoch: int = 0
    epoch_offset: int = 0
    global_step: int = 0
    skipped_steps: int = 0
    bad_images: int = 0
    grad_scaler: dict | None = field(default=None)

    def advance(self, global_batch: int) -> None:
        """One optimizer step (taken or skipped) over one global batch."""
        self.global_step += 1
        self.epoch_offset += global_batch

    def next_epoch(self) -> None:
        self.epoch, self.epoch_offset = self.epoch + 1, 0

    def state_dict(self, *, global_batch: int, world_size: int, global_seed: int, bad_images: int | None = None) -> dict:
        """The checkpoint's running_states.json. The run's constants are recorded beside the counters for people
        reading the file; ``bad_images``: the total including this session's (a collective count)."""
        return {"epoch": self.epoch, "epoch_offset": self.epoch_offset, "global_step": self.global_step,
                "step_in_epoch": self.epoch_offset // global_batch, "global_batch": global_batch,
                "world_size": world_size, "global_seed": global_seed, "rng": RNG_NOTE,
                "skipped_steps": self.skipped_steps,
                "bad_images": self.bad_images if bad_images is None else bad_images,
                "grad_scaler": self.grad_scaler}

    @classmethod
    def from_state_dict(cls, d: dict) -> "TrainState":
        """Read running_states.json. Position keys are required; checkpoints older than the skip counters (no
        ``skipped_steps`` / ``bad_images`` / ``grad_scaler``) had none of those events, so they read as 0 / None."""
        return cls(epoch=int(d["epoch"]), epoch_offset=int(d["epoch_offset"]), global_step=int(d["global_step"]),
                   skipped_steps=int(d.get("skipped_steps", 0)), bad_images=int(d.get("bad_images", 0)),
                   grad_scaler=d.get("grad_scaler") or None)

    def load_state_dict(self, d: dict) -> None:
        restored = self.from_state_dict(d)
        self.__dict__.update(restored.__dict__)
