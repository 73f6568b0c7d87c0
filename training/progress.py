"""Progress display: a tqdm bar (step, loss, tokens/s, ETA) on rank 0 in a terminal, plain lines otherwise.

When the output is not a TTY (CI, log files) the bar is off and rank 0 prints one line every
``print_every`` steps instead. Other ranks print nothing.
"""

import sys
import time
from typing import TextIO

from tqdm import tqdm

from . import distributed as distr


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


class Progress:
    """``update(step, loss, tokens)`` after every train step; ``close()`` at the end.

    ``step`` is the number of optimizer steps done (``Engine.step``); ``initial`` the step a resumed run
    starts from (ETA and tokens/s only count this session's steps).
    """

    def __init__(self, total_steps: int, initial: int = 0, print_every: int = 50, desc: str = "train",
                 stream: TextIO | None = None, enabled: bool | None = None, use_bar: bool | None = None):
        self.total, self.print_every, self.desc = total_steps, max(print_every, 1), desc
        self.stream = stream or sys.stderr
        self.enabled = distr.is_rank0() if enabled is None else enabled
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.use_bar = self.enabled and (tty if use_bar is None else use_bar)
        self.start_step, self.last_step = initial, initial
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.bar = tqdm(total=total_steps, initial=initial, desc=desc, file=self.stream, dynamic_ncols=True,
                        disable=not self.use_bar, unit="step")

    def update(self, step: int, loss: float, tokens: int = 0, **extra: float) -> None:
        """Record that ``step`` steps are done, the last one with ``loss`` over ``tokens`` tokens."""
        if not self.enabled:
            return
        self.tokens += tokens
        elapsed = time.perf_counter() - self.t0
        tok_s = self.tokens / elapsed if elapsed > 0 else 0.0
        done = step - self.start_step
        eta = (self.total - step) * elapsed / done if done > 0 else float("nan")
        if self.use_bar:
            self.bar.update(step - self.last_step)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", **{k: f"{v:.4g}" for k, v in extra.items()})
        elif step // self.print_every > self.last_step // self.print_every or step == self.total:
            parts = [f"{self.desc} step {step}/{self.total}", f"loss {loss:.4f}", f"tok/s {tok_s:,.0f}"]
            parts += [f"{k} {v:.4g}" for k, v in extra.items()]
            parts.append(f"eta {_duration(eta) if eta == eta else '?'}")
            print(" | ".join(parts), file=self.stream, flush=True)
        self.last_step = step

    def close(self) -> None:
        self.bar.close()
