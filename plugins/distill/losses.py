"""The losses ``distill`` compares a student's outputs with its teacher's by."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def as_float32(out: Any) -> Any:
    """A model output whose floating tensors (and tuples of them) are float32."""
    def cast(value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(cast(v) for v in value)
        return value.float() if hasattr(value, "is_floating_point") and value.is_floating_point() \
            else value
    if isinstance(out, tuple):
        return cast(out)
    for key in list(out.keys()):
        out[key] = cast(out[key])
    return out


def similarity_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """``cosine``: 1 - cos; ``mse``: MSE of L2-normalised rows; ``auto``: both. Rows are vectors."""
    import torch.nn.functional as F

    loss = student.new_zeros(())
    if kind in ("auto", "cosine"):
        loss = loss + (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if kind in ("auto", "mse"):
        loss = loss + F.mse_loss(F.normalize(student, dim=-1), F.normalize(teacher, dim=-1),
                                 reduction="sum") / student.shape[0]
    return loss


def relational_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the rows' cosine-similarity matrices: for a student whose vectors have fewer
    dimensions than the teacher's (hidden channels pruned), the similarities are what an embedding
    is used for, and they compare across widths."""
    import torch.nn.functional as F

    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    return F.mse_loss(s @ s.T, t @ t.T) * student.shape[0]


def logit_loss(task: str, s_logits: torch.Tensor, t_logits: torch.Tensor, mask: torch.Tensor,
               id_map: torch.Tensor | None, kind: str, temperature: float) -> torch.Tensor:
    """KL of temperature-softened distributions (``kind = "kl"``), MSE or cosine of the logits;
    token by token (on the student's tokens) except for a classifier."""
    import torch.nn.functional as F

    if id_map is not None and task != "classification":
        t_logits = t_logits[..., id_map[:s_logits.shape[-1]]]
    if task != "classification":
        s_logits, t_logits = s_logits[mask], t_logits[mask]
    if kind == "kl":
        t = temperature
        return F.kl_div(F.log_softmax(s_logits / t, -1), F.log_softmax(t_logits / t, -1),
                        log_target=True, reduction="batchmean") * t * t
    if kind == "mse":
        return F.mse_loss(s_logits, t_logits)
    return similarity_loss(s_logits, t_logits, "cosine")
