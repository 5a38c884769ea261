"""Training metrics: a console line and a JSON record per --log-interval, TensorBoard if asked.

Records go to ``<save>/metrics.jsonl`` (one JSON object per line). Step records carry: iteration,
phase, loss (the MCE in phase 1), loss_minus_target_entropy (phase 1 only: the MCE minus its floor,
the entropy of the normalised slot weights (log s for uniform weights, 0 for input-only mode or the
"first" weighting): the paper's KL form, 0 at the optimum; like the MCE it measures a bag-prediction
task and is NOT comparable with next-token losses), lr, grad_norm, raw_tokens (data tokens
consumed so far), latent_positions (positions the model processed so far), model_flops (so far),
tokens_per_s (raw data tokens per second), step_time_s, and mfu when --peak-flops is given.
Validation records carry validation_loss (always a next-token loss). Totals are kept in
checkpoints, and on resume records past the resumed iteration (written after the checkpoint by the
interrupted run) are dropped.
"""

from __future__ import annotations

import json
import math
import os

def model_flops_per_position(arch, seq_length: int) -> float:
    """Forward FLOPs per latent position: 2 x active matmul weights (the input embedding lookup is
    free) plus causal-agnostic attention scores and values, 4 x seq x query width per layer
    (Megatron's accounting). Training costs three times this."""
    counts = arch.parameter_counts()
    # the output head is a matmul whether or not it shares its table with the input embedding
    lookup_table = arch.vocab_size * arch.hidden_size if arch.untie_embeddings_and_output_weights else 0
    if arch.position_embedding_type == "learned_absolute":  # a lookup too
        lookup_table += arch.max_position_embeddings * arch.hidden_size
    matmul_weights = counts["active"] - lookup_table
    attention = 4 * seq_length * arch.num_attention_heads * arch.head_dim * arch.num_layers
    return 2 * matmul_weights + attention


def _logged_by(line: str, iteration: int) -> bool:
    """Whether a metrics.jsonl line is a whole record of an iteration up to ``iteration``."""
    try:
        return json.loads(line)["iteration"] <= iteration
    except (ValueError, KeyError, TypeError):
        return False


class MetricsLogger:
    def __init__(self, save_dir: str | None, tensorboard_dir: str | None, enabled: bool = True,
                 throughput: bool = False, wandb=None):
        self.enabled = enabled
        self.wandb = wandb  # logging_wandb.WandbWriter: the same records into W&B
        self.throughput = throughput  # --log-throughput: model TFLOP/s per GPU, as Megatron-LM
        self.path = os.path.join(save_dir, "metrics.jsonl") if (save_dir and enabled) else None
        self.raw_tokens = self.positions = self.flops = 0
        self.history: list[float] = []
        self._window: list[tuple[float, float, int, int]] = []
        self._tensorboard = None
        if tensorboard_dir and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard-dir needs the tensorboard package: pip install tensorboard") from None
            self._tensorboard = SummaryWriter(tensorboard_dir)

    def totals(self) -> dict:
        return {"raw_tokens": self.raw_tokens, "latent_positions": self.positions, "model_flops": self.flops}

    def restore(self, totals: dict, iteration: int) -> None:
        self.raw_tokens, self.positions, self.flops = (
            totals["raw_tokens"], totals["latent_positions"], totals["model_flops"])
        if self.path and os.path.isfile(self.path):  # drop what the interrupted run logged after the checkpoint
            with open(self.path) as handle:  # a record cut short by a kill (no newline) is dropped too
                kept = [line for line in handle if line.endswith("\n") and _logged_by(line, iteration)]
            with open(self.path + ".tmp", "w") as handle:
                handle.writelines(kept)
            os.replace(self.path + ".tmp", self.path)

    def _write(self, record: dict) -> None:
        if self.path:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self._tensorboard:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration" and value is not None:
                    self._tensorboard.add_scalar(key, value, record["iteration"])
        if self.wandb:
            self.wandb.write(record)

    def step(self, *, iteration, phase, loss, target_entropy, lr, grad_norm, raw_tokens, positions, flops,
             step_time, peak_flops, world_size, log) -> None:
        self.raw_tokens += raw_tokens
        self.positions += positions
        self.flops += flops
        self.history.append(loss)
        self._window.append((loss, step_time, raw_tokens, flops))
        if not (log and self.enabled):
            return
        losses, times, tokens, window_flops = zip(*self._window)
        self._window = []
        mean_loss, elapsed = sum(losses) / len(losses), sum(times)
        superposition = phase == "superposition"
        record = {
            "iteration": iteration,
            "phase": phase,
            "loss": mean_loss,
            "loss_minus_target_entropy": mean_loss - target_entropy if superposition else None,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "raw_tokens": self.raw_tokens,
            "latent_positions": self.positions,
            "model_flops": self.flops,
            "tokens_per_s": sum(tokens) / elapsed if elapsed else None,
            "step_time_s": elapsed / len(times),
            "mfu": sum(window_flops) / elapsed / (peak_flops * world_size) if peak_flops and elapsed else None,
        }
        if self.throughput:
            record["tflops_per_gpu"] = sum(window_flops) / elapsed / world_size / 1e12 if elapsed else None
        self._write(record)
        kl = f" (KL-scale {record['loss_minus_target_entropy']:.4f})" if superposition else ""
        mfu = f" | MFU {100 * record['mfu']:.1f}%" if record["mfu"] is not None else ""
        if record.get("tflops_per_gpu") is not None:
            mfu += f" | {record['tflops_per_gpu']:.3f} TFLOP/s/GPU"
        grad = f"{record['grad_norm']:.3f}" if record["grad_norm"] is not None else "n/a"
        print(f" iteration {iteration:8d} | {phase:13s} | loss {mean_loss:.4f}{kl} | lr {lr:.3e} | "
              f"grad norm {grad} | tokens {self.raw_tokens:,} | "
              f"{record['tokens_per_s'] or 0:,.0f} tok/s | {1000 * record['step_time_s']:.0f} ms/step{mfu}",
              flush=True)

    def validation(self, iteration: int, phase: str, loss: float | None) -> None:
        if loss is None or not self.enabled:
            return
        self._write({"iteration": iteration, "phase": phase, "validation_loss": loss})
        print(f" validation at iteration {iteration:8d} | next-token loss {loss:.4f} | "
              f"ppl {math.exp(min(loss, 50)):.2f}", flush=True)

    def close(self) -> None:
        if self._tensorboard:
            self._tensorboard.close()
        if self.wandb:
            self.wandb.close()
            self.wandb = None
