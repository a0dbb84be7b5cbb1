"""TRL 1.15's GRPOTrainer computes per-token log-probs with a Triton kernel (its "fused LM head")
and has no fallback when Triton is missing, which is every CPU-only PyTorch install: training then
fails with "'NoneType' object has no attribute 'apply'". This is the same computation in plain
PyTorch (autograd does the backward), installed only when TRL's kernel is absent. On CUDA machines
TRL's own kernel is used untouched.
"""

from __future__ import annotations

import torch


class TorchChunkedLogProb:
    """Same signature and outputs as trl.kernels.ChunkedLogProbFunction.apply, materialising logits."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        z = (hidden @ weight.t()).float()
        if bias is not None:
            z = z + bias.float()
        z = z * logit_scale
        if final_logit_softcapping is not None:
            z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
        z = z / temperature
        log_p = torch.log_softmax(z, dim=-1)
        logprobs = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_p.exp() * log_p).sum(-1) if "entropy" in outputs else None
        with torch.no_grad():
            log_sum_sq = torch.logsumexp(2 * log_p, dim=-1) if "log_sum_sq_probs" in outputs else None
            mean_logits = z.mean(-1) if "mean_logits" in outputs else None
            # argmax takes the first maximum: a tie with an earlier token is not a top-1 prediction
            is_top1 = (z.argmax(-1) == targets) if "is_top1" in outputs else None
        return logprobs, entropy, log_sum_sq, mean_logits, is_top1


def install_if_needed() -> bool:
    """Put the fallback in place when TRL could not load its Triton kernel. Returns whether it did."""
    from trl.trainer import utils

    if utils._ChunkedLogProbFunction is not None:
        return False
    utils._ChunkedLogProbFunction = TorchChunkedLogProb
    return True
