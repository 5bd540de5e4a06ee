"""TensorBoard scalars without TensorFlow (tensorboardX), and the console progress bar.

``read_scalars`` parses an event file back (tests, quick inspection).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Mapping


class EventWriter:
    """Scalar summaries for TensorBoard under ``logdir`` (written with tensorboardX)."""

    def __init__(self, logdir: str | os.PathLike) -> None:
        from tensorboardX import SummaryWriter

        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._w = SummaryWriter(logdir=str(self.logdir), flush_secs=30)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Write every ``tag: value`` at ``step``."""
        for tag, value in values.items():
            self._w.add_scalar(tag, float(value), global_step=int(step))

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def read_scalars(path: str | os.PathLike) -> list[tuple[int, str, float]]:
    """``(step, tag, value)`` of every scalar in an event file (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    data = Path(path).read_bytes()
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
        i += 16 + n
        for v in event.summary.value:
            out.append((int(event.step), v.tag, float(v.simple_value)))
    return out


# ------------------------------------------------------------------ progress
class Progress:
    """tqdm bar (or nothing) showing the step and the latest loss."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def update(self, n: int, **postfix: float) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
