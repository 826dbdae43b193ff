"""The prediction MLP that sits on the student during distillation and is dropped afterwards."""

from __future__ import annotations

from torch import nn

from models.errors import UserError

HEAD_LAYERS = (0, 2, 4)


def build_head(in_dim: int, out_dim: int, n_layers: int = 4) -> nn.Sequential:
    """Prediction head mapping the student feature (B, in_dim) to the teacher space (B, out_dim).

    - 4 (the paper): Linear(d,2d) BN ReLU Linear(2d,d) Linear(d,2d) BN ReLU Linear(2d,D). There is
      deliberately no BN/ReLU between the 2nd and 3rd linear, so parameters sit at indices
      0, 1, 3, 4, 5, 7 as in the authors' released checkpoints.
    - 2: Linear(d,2d) BN ReLU Linear(2d,D). The original built this without BN/ReLU (two stacked
      linears, i.e. one linear map); we build the intended non-linear head.
    - 0: the linear predictor BN(d) Linear(d,D) (it crashed in the original).
    """
    d, h = in_dim, 2 * in_dim
    if n_layers == 4:
        layers = [
            nn.Linear(d, h),
            nn.BatchNorm1d(h),
            nn.ReLU(inplace=True),
            nn.Linear(h, d),
            nn.Linear(d, h),
            nn.BatchNorm1d(h),
            nn.ReLU(inplace=True),
            nn.Linear(h, out_dim),
        ]
    elif n_layers == 2:
        layers = [nn.Linear(d, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Linear(h, out_dim)]
    elif n_layers == 0:
        layers = [nn.BatchNorm1d(d), nn.Linear(d, out_dim)]
    else:
        raise UserError(f"--n_mlp_layers must be one of {HEAD_LAYERS}, got {n_layers}")
    return nn.Sequential(*layers)
