"""The loss of a training step: the config's terms, one per model output, and the
distillation term that lets a frozen FP32 model teach the QAT model."""
from typing import Dict, List

from segslim._paddle import paddle
from segslim.errors import UserError


def compute_loss(logits: List[paddle.Tensor], labels: paddle.Tensor,
                 losses: Dict[str, list]) -> List[paddle.Tensor]:
    """Weighted losses, one per model output (the counts must match `loss.coef`), with
    PaddleSeg's special cases: MixedLoss gives one term per inner loss, KLLoss compares the
    first two outputs. Each loss gets its own copy of the labels: PaddleSeg 2.8's DiceLoss
    writes 0 into the ignored pixels of the labels it is given, which would make every later
    term count them as class 0 (and Paddle 3 refuses the backward pass of a term whose
    saved labels were overwritten)."""
    if len(logits) != len(losses['coef']):
        raise UserError('config key `loss.coef`: the model has {} outputs but coef has {} '
                        'entries; give one coefficient per output'.format(
                            len(logits), len(losses['coef'])))
    terms: List[paddle.Tensor] = []
    for logit, loss, coef in zip(logits, losses['types'], losses['coef']):
        kind = type(loss).__name__
        if kind == 'MixedLoss':
            terms.extend(coef * term for term in _mixed(loss, logit, labels))
        elif kind == 'KLLoss':
            terms.append(coef * loss(logits[0], logits[1].detach()))
        else:
            terms.append(coef * loss(logit, labels.clone()))
    return terms


def _mixed(loss, logit: paddle.Tensor, labels: paddle.Tensor) -> List[paddle.Tensor]:
    """PaddleSeg's MixedLoss.forward (one weighted term per inner loss), each inner loss on
    its own copy of the labels."""
    return [inner(logit, labels.clone()) * coef
            for inner, coef in zip(loss.losses, loss.coef)]


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
