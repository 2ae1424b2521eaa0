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
