from __future__ import annotations

import os
import tempfile

import pytest
import torch
from torch import nn


def pytest_configure(config: pytest.Config) -> None:
    """Run-signing keys go to a temporary folder, never to the user's ~/.local/state."""
    os.environ["PTQKIT_STATE"] = tempfile.mkdtemp(prefix="ptqkit-state-")


def ort_saturates() -> bool:
    """True on x86 CPUs without VNNI, where ONNX Runtime's U8S8 integer kernels add u8 x s8
    pairs in saturating int16: tests that compare ONNX Runtime with the simulation then use
    7-bit weights everywhere, as ptqkit's deploy recipe does on such CPUs."""
    from ptqkit.export.onnx import cpu_info

    cpu = cpu_info()
    return bool(cpu["x86"] and not cpu["vnni"])


def ort_safe(w_bits: int = 8, **recipe: object) -> dict[str, object]:
    """Recipe fields for an ONNX Runtime parity test: ``w_bits`` and ``recipe`` as given, or on
    a CPU where ``ort_saturates``, at most 7-bit weights and no 8-bit first/last layers."""
    if ort_saturates():
        return {**recipe, "w_bits": min(w_bits, 7), "first_last_8bit": False}
    return {**recipe, "w_bits": w_bits}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class TinyNet(nn.Module):
    """Conv-BN-ReLU, depthwise conv, residual add, linear head: small but covers the surgery."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = y + torch.relu(self.bn2(self.dw(y)))
        return self.fc(y.mean((2, 3)))


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.fixture
def tiny() -> nn.Module:
    return _randomize_bn(TinyNet())


@pytest.fixture
def tiny_data() -> torch.Tensor:
    return torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny ops: thread hand-offs cost more than they save, so run them on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
