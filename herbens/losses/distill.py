"""Knowledge distillation from sparse teacher targets (Hinton et al. 2015).

The teacher of a level is known through its top-K classes (log-probabilities ``logp``) and the
mass ``rest`` of all other classes (:mod:`herbens.targets`); the rest is taken as spread evenly
over those C - K classes, which is the maximum-entropy reading of what was stored. With that
dense teacher q and the student's logits z, the loss at temperature T is

    T^2 * KL(q_T || softmax(z / T)),   q_T proportional to q^(1/T),

computed in closed form from the K stored classes and one shared term for the others, so no
``[B, C]`` teacher is ever built.

Optional per-image weights multiply each image's term before the plain batch mean, as the
class-balanced loss weights its CE (Balanced KD, Zhang et al. 2021): on a long tail the
unweighted term is dominated by the common species' images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sparse_kl_div(student_logits: torch.Tensor, classes: torch.Tensor, logp: torch.Tensor,
                  rest: torch.Tensor, temperature: float = 1.0,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of ``T^2 * KL(teacher_T || student_T)`` (fp32), optionally weighted.

    Args:
        student_logits: ``[B, C]`` logits.
        classes: ``[B, K]`` the teacher's top-K class indices (long).
        logp: ``[B, K]`` their teacher log-probabilities.
        rest: ``[B]`` teacher probability of all other classes together.
        temperature: T > 0 (softens both distributions).
        weights: ``[B]`` factor on each image's term (None: 1); the batch mean is plain, not
            divided by the weights' sum.
    """
    t = float(temperature)
    z = student_logits.float()
    num_classes, k = z.shape[1], classes.shape[1]
    others = num_classes - k
    student = F.log_softmax(z / t, dim=1)
    top = logp.float() / t                                           # log q^(1/T), stored classes
    rest = rest.float().clamp_min(0.0)
    has_rest = (rest > 0) & (others > 0)
    # log of each other class's q^(1/T): log(rest / others) / T (unused where there is no rest).
    other = torch.where(has_rest, torch.log(rest.clamp_min(1e-38) / max(others, 1)) / t,
                        torch.full_like(rest, -math.inf))
    log_z = torch.logsumexp(torch.cat([top, (other + math.log(max(others, 1))).unsqueeze(1)], dim=1), dim=1)
    teacher_top = top - log_z.unsqueeze(1)                            # log q_T on the stored classes
    student_top = student.gather(1, classes.long())
    kl = (teacher_top.exp() * (teacher_top - student_top)).sum(dim=1)
    teacher_other = other - log_z                                     # log q_T of each other class
    student_other_sum = student.sum(dim=1) - student_top.sum(dim=1)
    q_other = torch.where(has_rest, teacher_other.exp(), torch.zeros_like(rest))
    safe_other = torch.where(has_rest, teacher_other, torch.zeros_like(rest))
    kl = kl + q_other * (others * safe_other - student_other_sum)
    if weights is not None:
        kl = kl * weights.float()
    return kl.mean() * (t * t)
