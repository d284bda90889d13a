from __future__ import annotations

import torch
from torch import nn

from ptqkit.calib.capture import collect_input_samples
from ptqkit.calib.data import CalibrationData


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_padded_tokens_are_left_out_of_activation_statistics() -> None:
    x = torch.rand(2, 4, 3)  # values in [0, 1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    x[mask == 0] = 100.0  # padding positions carry outliers
    model = _TokenModel()
    data = CalibrationData([{"x": x, "attention_mask": mask}])
    got = collect_input_samples(model, {"fc": model.fc}, data)["fc"]
    assert got.numel() == 5 * 3 and float(got.max()) < 1.0
    assert torch.equal(got.sort().values, x[mask.bool()].reshape(-1).sort().values)
    plain = CalibrationData([x])  # no mask: every position counts
    model.forward = lambda t: model.fc(t)  # type: ignore[method-assign]
    assert float(collect_input_samples(model, {"fc": model.fc}, plain)["fc"].max()) == 100.0
