"""torch.optim.AdamW and torch.nn.utils.clip_grad_norm_ over a pyrnn module. The update itself is
the module's engine's (Engine.adamw_step): C's adamw_update for backend='c', the GPU's for 'cuda',
the oracle's for 'numpy'."""
import math

import numpy as np

from . import validate
from .nn import Module


class AdamW:
    """torch.optim.AdamW over one module's parameters (one param group; decay on every parameter).

        opt = pyrnn.AdamW(model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        opt.zero_grad(); ...forward, backward...; opt.step()

    The moments live with the module (as in the C trainer), so CharLM.save / load keep them and
    CharLM.step continues them. step() raises FloatingPointError when a gradient is not finite and
    then changes neither the parameters nor the moments. param_groups[0] holds the
    hyperparameters and may be edited between steps (e.g. a learning-rate schedule), as in torch.
    """

    def __init__(self, module, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        if not isinstance(module, Module):
            raise TypeError(f'AdamW takes a pyrnn module, got {type(module).__name__}')
        lr, betas, eps, weight_decay = validate.adamw_hyperparameters(lr, betas, eps, weight_decay)
        self.module = module
        self.param_groups = [dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)]

    def __repr__(self):
        return f'AdamW({type(self.module).__name__}, {self.param_groups[0]})'

    def zero_grad(self):
        self.module.zero_grad()

    def step(self):
        g = self.param_groups[0]
        hp = validate.adamw_hyperparameters(g['lr'], g['betas'], g['eps'], g['weight_decay'])
        self.module._engine.adamw_step(*hp, None)

    def state_dict(self):
        """torch's layout: {'state': {i: {'step', 'exp_avg', 'exp_avg_sq'}}, 'param_groups': [...]},
        i indexing parameters() in order; state is empty before the first step. Arrays are copies."""
        names = list(self.module._engine.params)
        st = self.module._engine.adam_state()
        state = {} if st is None else {i: dict(step=st[2], exp_avg=st[0][n].copy(), exp_avg_sq=st[1][n].copy())
                                       for i, n in enumerate(names)}
        return dict(state=state, param_groups=[dict(self.param_groups[0], params=list(range(len(names))))])

    def load_state_dict(self, state_dict):
        """Load what state_dict() gave (from this or an equal module); checked before anything changes.
        An empty state starts AdamW afresh, as in torch."""
        engine = self.module._engine
        names = list(engine.params)
        try:
            group, state = state_dict['param_groups'][0], state_dict['state']
            hp = validate.adamw_hyperparameters(group['lr'], group['betas'], group['eps'], group['weight_decay'])
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f'not an AdamW state dict: {e!r}') from None
        m, v, t = {}, {}, 0
        if state:
            if sorted(state) != list(range(len(names))):
                raise ValueError(f'the state holds parameters {sorted(state)}, the module has {len(names)}')
            steps = {int(s['step']) for s in state.values()}
            if len(steps) != 1 or min(steps) < 1:
                raise ValueError(f'every parameter must have the same step count >= 1, got {sorted(steps)}')
            t = steps.pop()
            for i, n in enumerate(names):
                m[n] = validate.floats(state[i]['exp_avg'], f'exp_avg of {n}', engine.params[n].shape)
                v[n] = validate.floats(state[i]['exp_avg_sq'], f'exp_avg_sq of {n}', engine.params[n].shape)
        engine.load_adam(m, v, t)
        self.param_groups = [dict(zip(('lr', 'betas', 'eps', 'weight_decay'), hp))]


def clip_grad_norm_(module, max_norm):
    """torch.nn.utils.clip_grad_norm_: scales the module's gradients in place so that their global
    L2 norm is at most max_norm (coefficient max_norm / (norm + 1e-6), applied when below 1).
    Returns the norm before clipping (a float; inf or nan for non-finite gradients, which are then
    scaled by nan, as torch does)."""
    max_norm = float(max_norm)
    if not max_norm >= 0:
        raise ValueError(f'max_norm must be >= 0, got {max_norm}')
    if not isinstance(module, Module):
        raise TypeError(f'clip_grad_norm_ takes a pyrnn module, got {type(module).__name__}')
    grads = module._engine.writable_grads()
    norm = math.sqrt(sum(float(np.dot(g.ravel().astype(np.float64), g.ravel())) for g in grads.values()))
    coef = min(max_norm / (norm + 1e-6), 1.0) if math.isfinite(norm) else math.nan
    if coef != 1.0:
        for g in grads.values():
            g *= np.float32(coef)
    return norm
