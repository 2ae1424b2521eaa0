"""Small networks shared by the compile, export and TorchScript tests."""

import torch
import torch.nn as nn

import matterhorn_pytorch as mth


class MixedConvNet(nn.Module):
    """All six convolutions on a [T, B, 2, 8, 8] spike train: 2d, 1d over flattened rows, and
    3d with a depth-1 kernel axis."""

    def __init__(self):
        super().__init__()
        self.conv2d = mth.snn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.deconv2d = mth.snn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)
        self.conv1d = mth.snn.Conv1d(2, 4, 4, padding="same", groups=2)
        self.deconv1d = mth.snn.ConvTranspose1d(4, 2, 3, padding=1)
        self.conv3d = mth.snn.Conv3d(2, 4, (3, 3, 1), padding=(1, 1, 0), padding_mode="circular")
        self.deconv3d = mth.snn.ConvTranspose3d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.deconv2d(torch.relu(self.conv2d(x)))             # [T, B, 2, 16, 16]
        b = self.deconv1d(torch.relu(self.conv1d(x.flatten(-2))))  # [T, B, 2, 64]
        c = self.deconv3d(torch.relu(self.conv3d(x.unsqueeze(-1))))  # [T, B, 2, 8, 8, 1]
        return torch.cat([a.flatten(2), b.flatten(2), c.flatten(2)], dim=2)


class NormNet(nn.Module):
    """Conv -> BatchNorm2d -> per-step BatchNorm1d -> LayerNorm -> Linear on [T, B, 2, 6, 6]."""

    def __init__(self):
        super().__init__()
        self.conv = mth.snn.Conv2d(2, 4, 3, padding=1)
        self.bn2d = mth.snn.BatchNorm2d(4)
        self.linear1 = mth.snn.Linear(4 * 6 * 6, 8)
        self.bn1d = mth.snn.BatchNorm1d(8, per_step=True, momentum=None)
        self.ln = mth.snn.LayerNorm(8)
        self.linear2 = mth.snn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn2d(self.conv(x))).flatten(2)
        return self.linear2(self.ln(torch.relu(self.bn1d(self.linear1(h)))))


class ConvBNLinear(nn.Module):
    """[T, B, 2, 6, 6] -> [T, B, 5]: conv, BatchNorm and linear, for export and serving."""

    def __init__(self):
        super().__init__()
        self.conv = mth.snn.Conv2d(2, 4, 3, padding=1)
        self.bn = mth.snn.BatchNorm2d(4)
        self.fc = mth.snn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(2))
