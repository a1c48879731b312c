"""What a run reports (rank 0 only): progress bar, log lines, TensorBoard, metrics, loss plot.

Every metric also goes to `metrics.jsonl` (one JSON object per line) next to the checkpoints,
so a finished run can be re-plotted or compared without TensorBoard.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional


class RunLogger:
    def __init__(self, output_dir: Optional[str], tensorboard_dir: Optional[str],
                 total_iters: int, start_iter: int, enabled: bool, progress_bar: bool,
                 log_interval: int = 10):
        self.enabled = enabled
        self.log_interval = log_interval
        self.output_dir = output_dir
        self.train_points: List[tuple] = []   # (iteration, loss)
        self._interval_losses: List[float] = []
        self.valid_points: List[tuple] = []   # (iteration, loss)
        self.unigram_ce: Optional[float] = None  # validation targets, training unigram model
        self.bar = None
        self.writer = None
        self.metrics_file = None
        if not enabled:
            return
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
            self._read_history(os.path.join(output_dir, "metrics.jsonl"), start_iter)
            self.metrics_file = open(os.path.join(output_dir, "metrics.jsonl"), "a",
                                     encoding="utf-8")
        if tensorboard_dir:
            self.writer = _summary_writer(tensorboard_dir)
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_iters, initial=start_iter, unit="it", dynamic_ncols=True,
                            file=sys.stderr)

    def _read_history(self, path: str, start_iter: int) -> None:
        """Points of earlier (resumed-from) runs, so the plot shows the whole curve."""
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if record["iteration"] > start_iter:
                    continue  # a later part of an abandoned run: this run redoes it
                if record["kind"] == "train":
                    self.train_points.append((record["iteration"], record["loss"]))
                elif record["kind"] == "valid":
                    self.valid_points.append((record["iteration"], record["all"]))
                    self.unigram_ce = record.get("unigram_ce", self.unigram_ce)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def train_step(self, iteration: int, metrics: Dict[str, float], log_line: bool) -> None:
        if not self.enabled:
            return
        self.train_points.append((iteration, metrics["loss"]))
        self._interval_losses.append(metrics["loss"])
        self._record("train", iteration, metrics)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                                 tok_s=f"{metrics['tokens_per_s']:.0f}")
        if log_line:  # the loss is the mean since the last log line, as Megatron logs it
            mean_loss = sum(self._interval_losses) / len(self._interval_losses)
            self._interval_losses = []
            self.print(f"iter {iteration:6d} | loss {mean_loss:.4f} | "
                       f"grad norm {metrics['grad_norm']:.3f} | lr {metrics['lr']:.3e} | "
                       f"{metrics['tokens_per_s']:.0f} tokens/s | "
                       f"{format_tflops(metrics.get('tflops_per_rank'), metrics.get('mfu'))}"
                       f"{metrics['step_time_s'] * 1000:.0f} ms/step")

    def validation(self, iteration: int, losses: Dict[str, float],
                   unigram_ce: Optional[float] = None) -> None:
        """`unigram_ce`: the validation targets' cross-entropy under the training unigram
        distribution, logged next to the loss (and as `unigram_ce` in metrics.jsonl)."""
        if not self.enabled:
            return
        self.valid_points.append((iteration, losses["all"]))
        self.unigram_ce = unigram_ce if unigram_ce is not None else self.unigram_ce
        record = dict(losses) if unigram_ce is None else {**losses, "unigram_ce": unigram_ce}
        self._record("valid", iteration, record)
        per_domain = ", ".join(f"{k} {v:.4f}" for k, v in losses.items() if k != "all")
        unigram = f" (unigram CE {unigram_ce:.4f})" if unigram_ce is not None else ""
        self.print(f"valid at iter {iteration} | loss {losses['all']:.4f}{unigram}"
                   + (f" | {per_domain}" if per_domain else ""))

    def _record(self, kind: str, iteration: int, values: Dict[str, float]) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps({"kind": kind, "iteration": iteration,
                                                **values}) + "\n")
            self.metrics_file.flush()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{kind}/{key}", value, iteration)

    def plot(self, path: str) -> Optional[str]:
        """Save the loss curve as PNG (matplotlib Agg); returns the path."""
        if not self.enabled or not self.train_points:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        steps, losses = zip(*self.train_points)
        ax.plot(steps, losses, label="train loss (per step)", linewidth=0.8, alpha=0.35)
        # A step holds a few windows, so its loss swings with their domains; the running
        # mean over a log interval is the curve to read.
        span = max(1, min(self.log_interval, len(losses)))
        windows = [losses[max(0, i - span + 1):i + 1] for i in range(len(losses))]
        smooth = [sum(w) / len(w) for w in windows]
        ax.plot(steps, smooth, label=f"train loss (mean of {span} steps)", linewidth=1.6)
        if self.valid_points:
            ax.plot(*zip(*self.valid_points), "o-", label="valid loss")
        if self.unigram_ce is not None:
            ax.axhline(self.unigram_ce, color="grey", linestyle="--", linewidth=1,
                       label=f"valid unigram CE ({self.unigram_ce:.2f})")
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss (nats / trained token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.metrics_file is not None:
            self.metrics_file.close()


def format_tflops(tflops_per_rank: Optional[float], mfu: Optional[float]) -> str:
    """'12.3 TFLOP/s/rank | MFU 41.2% | ' (MFU only with a declared peak)."""
    if tflops_per_rank is None:
        return ""
    text = f"{tflops_per_rank:.3g} TFLOP/s/rank | "
    return text + (f"MFU {100 * mfu:.1f}% | " if mfu is not None else "")


def _summary_writer(directory: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # tensorboard is an optional (dev) dependency
        raise RuntimeError(f"--tensorboard-dir needs the tensorboard package ({err}); "
                           "pip install tensorboard") from None
    return SummaryWriter(log_dir=directory)
