"""The loss of a training step: the config's terms, one per model output, and the
distillation term that lets a frozen FP32 model teach the QAT model."""
from typing import Dict, List

from segslim._paddle import paddle
from segslim.errors import UserError


def compute_loss(logits: List[paddle.Tensor], labels: paddle.Tensor,
                 losses: Dict[str, list]) -> List[paddle.Tensor]:
    """Weighted losses, one per model output (the counts must match `loss.coef`), with
    PaddleSeg's special cases: MixedLoss gives one term per inner loss, KLLoss compares the
    first two outputs."""
    if len(logits) != len(losses['coef']):
        raise UserError('config key `loss.coef`: the model has {} outputs but coef has {} '
                        'entries; give one coefficient per output'.format(
                            len(logits), len(losses['coef'])))
    terms: List[paddle.Tensor] = []
    for logit, loss, coef in zip(logits, losses['types'], losses['coef']):
        kind = type(loss).__name__
        if kind == 'MixedLoss':
            terms.extend(coef * term for term in loss(logit, labels))
        elif kind == 'KLLoss':
            terms.append(coef * loss(logits[0], logits[1].detach()))
        else:
            terms.append(coef * loss(logit, labels))
    return terms


def distill_loss(student: paddle.Tensor, teacher: paddle.Tensor, temperature: float = 1.0,
                 axis: int = 1) -> paddle.Tensor:
    """KL(teacher || student) of the per-pixel class distributions at `temperature`, averaged
    over pixels and scaled by temperature^2 (so its gradients keep their size as the
    temperature softens the distributions). `teacher` carries no gradient."""
    import paddle.nn.functional as F
    t = F.softmax(teacher.detach() / temperature, axis=axis)
    log_s = F.log_softmax(student / temperature, axis=axis)
    log_t = F.log_softmax(teacher.detach() / temperature, axis=axis)
    per_pixel = (t * (log_t - log_s)).sum(axis=axis)
    return per_pixel.mean() * temperature ** 2
