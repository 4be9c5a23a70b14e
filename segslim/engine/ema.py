"""Exponential moving average of model weights (train.py --use_ema)."""
import copy

from segslim._paddle import paddle


class ModelEMA:
    """A frozen copy of the model whose floating-point state follows
    ema = decay * ema + (1 - decay) * model, with decay = min(1 - 1 / (step + 1), decay)
    (PaddleSeg's rule: early steps follow the model closely)."""

    def __init__(self, model: paddle.nn.Layer, decay: float = 0.999):
        self.decay = decay
        self.model = copy.deepcopy(model)
        self.model.eval()
        for param in self.model.parameters():
            param.stop_gradient = True

    @paddle.no_grad()
    def update(self, model: paddle.nn.Layer, step: int) -> None:
        decay = min(1.0 - 1.0 / (step + 1), self.decay)
        current = model.state_dict()
        state = {}
        for key, value in self.model.state_dict().items():
            if paddle.is_floating_point(value):
                value = value * decay + current[key].detach() * (1.0 - decay)
            state[key] = value
        self.model.set_state_dict(state)

    def state_dict(self) -> dict:
        return self.model.state_dict()
